"""The run directory: its file names, atomic writes, readers, checkpoint discovery and resume.

Every workflow reads and writes runs through this module; no other module spells a file name of a run.
Nothing here imports torch or transformers, so readers (report, compare, lengthbias) stay light.

    runs/<run_name>/
      config.yaml          every resolved field + provenance (versions, git commit, command)
      metrics.jsonl        one record per logged step (train and eval_*)
      tensorboard/         TensorBoard event files
      checkpoint-N/        Trainer checkpoints (for --resume)
      final/               the trained model (safetensors) + tokenizer
      summary.json         steps, time, pairs/s, final and best metrics, diagnostics
      eval/<name>/         eval.jsonl + eval.json of `dpolab eval` (one directory per scored model)
      sweep.csv, sweep.png `dpolab sweep`
      generations.*        `dpolab generate`
      judge.jsonl, judge.json   `dpolab judge`
      plots/, report.html  `dpolab report`
      demo.json            `dpolab demo`
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dpolab.errors import DpolabError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
FINAL_DIR = "final"
EVAL_DIR = "eval"
EVAL_RECORDS = "eval.jsonl"
EVAL_SUMMARY = "eval.json"
SWEEP_CSV = "sweep.csv"
SWEEP_PNG = "sweep.png"
GENERATIONS = "generations.jsonl"
GENERATION_STATS = "generations.json"
GENERATIONS_HTML = "generations.html"
JUDGE_RECORDS = "judge.jsonl"
JUDGE_SUMMARY = "judge.json"
PLOTS_DIR = "plots"
REPORT_HTML = "report.html"
DEMO_SUMMARY = "demo.json"
CHECKPOINT_PREFIX = "checkpoint-"
# The curves people watch, in TRL's own metric names (metrics.jsonl keys; summary.json's final values).
KEY_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
# TRL's per-step metrics computed in the forward pass (a NaN there is the model's, whatever the logged loss shows).
FORWARD_METRIC_PREFIXES = ("rewards/", "logps/", "logits/", "entropy", "mean_token_accuracy")
# config.yaml carries versions etc. under this key; loading it back as a config skips the key.
PROVENANCE_KEY = "dpolab_provenance"
# tensorboard/'s Custom Scalars tab: {section: {chart: the metrics drawn on it}}, each metric as transformers names it
# (train/<name>, eval/<name>): train and eval on one chart, chosen beside rejected, where the Scalars tab draws each
# metric on a chart of its own among ~35.
TENSORBOARD_LAYOUT = {
    "DPO: train and eval on one chart": {
        "loss": ["train/loss", "eval/loss"],
        "rewards/margins": ["train/rewards/margins", "eval/rewards/margins"],
        "rewards/accuracies": ["train/rewards/accuracies", "eval/rewards/accuracies"],
        "logps: chosen and rejected": ["train/logps/chosen", "train/logps/rejected", "eval/logps/chosen",
                                       "eval/logps/rejected"],
        "rewards: chosen and rejected": ["train/rewards/chosen", "train/rewards/rejected", "eval/rewards/chosen",
                                         "eval/rewards/rejected"],
    },
    "Optimization": {
        "learning rate and gradient norm": ["train/learning_rate", "train/grad_norm"],
        "weights moved": ["train/weights/changed_share", "train/weights/relative_change"],
    },
}  # fmt: skip


# --- files ---------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2))


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file (none if it is missing); a last line cut off by a crash mid-write is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _number(text: str):
    """A CSV cell as an int, a float, None (empty) or the text itself."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


# --- the run directory -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """One run's directory and the paths of everything in it."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL_DIR

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    def file(self, name: str) -> Path:
        """A file of the run named by one of this module's constants (SWEEP_CSV, REPORT_HTML, ...)."""
        return self.path / name

    def eval_dir(self, model_name: str) -> Path:
        """Where `dpolab eval` writes the scores of one model of this run (final, checkpoint-N, base)."""
        return self.path / EVAL_DIR / model_name

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def read_config(self) -> dict:
        """config.yaml as a mapping ({} when missing)."""
        from dpolab.config import load_yaml

        return load_yaml(self.config_file) if self.config_file.is_file() else {}

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def read_summary(self) -> dict | None:
        return read_json(self.summary_file)

    def read_eval(self, model_name: str = FINAL_DIR) -> dict | None:
        return read_json(self.eval_dir(model_name) / EVAL_SUMMARY)

    def read_sweep(self) -> list[dict]:
        """The rows of sweep.csv with numbers as numbers ([] when the run has no sweep)."""
        import csv

        path = self.file(SWEEP_CSV)
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as file:
            return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(file)]

    def base_model(self) -> str:
        """The model the run started from (its `model_name_or_path`)."""
        return self.read_config()["model_name_or_path"]

    def checkpoints(self) -> list[Path]:
        """checkpoint-N directories in step order."""
        return sorted(self.path.glob(CHECKPOINT_PREFIX + "*"), key=checkpoint_step)

    def last_complete_checkpoint(self) -> Path | None:
        """The newest checkpoint-N whose trainer_state.json (written last by Trainer) is whole.

        A process killed while saving leaves a checkpoint without it, or with half of it; that one is skipped.
        """
        for checkpoint in reversed(self.checkpoints()):
            try:
                json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            return checkpoint
        return None

    def truncate_metrics(self, step: int) -> None:
        """Keep the records up to `step`: a resumed run logs the later steps again."""
        if self.metrics_file.is_file():
            write_jsonl(self.metrics_file, [record for record in self.read_metrics() if record["step"] <= step])


@dataclass
class RunFiles:
    """Everything a run's workflows wrote that report and compare show (missing pieces are None or empty)."""

    run: RunDir
    records: list[dict]
    config: dict
    summary: dict | None
    final_eval: dict | None
    generations: list[dict]
    generation_stats: dict | None
    sweep: list[dict]
    judge: dict | None
    demo: dict | None


def read_run_files(run: RunDir) -> RunFiles:
    """Read what a run holds; a directory without metrics is not a run (a DpolabError says so)."""
    records = run.read_metrics()
    if not records:
        raise DpolabError(f"{run.path} has no {METRICS_FILE} (or it is empty): is it a dpolab run directory?")
    return RunFiles(
        run=run,
        records=records,
        config=run.read_config(),
        summary=run.read_summary(),
        final_eval=run.read_eval(),
        generations=read_jsonl(run.file(GENERATIONS)),
        generation_stats=read_json(run.file(GENERATION_STATS)),
        sweep=run.read_sweep(),
        judge=read_json(run.file(JUDGE_SUMMARY)),
        demo=read_json(run.file(DEMO_SUMMARY)),
    )


def find_resume_checkpoint(run: RunDir, resume: bool) -> str | None:
    """The checkpoint to resume from (None for a new run); an existing run is never overwritten."""
    if not resume:
        if run.path.exists():
            raise DpolabError(
                f"Run directory {run.path} already exists and is never overwritten. Continue it with --resume "
                f"(from its last checkpoint) or start a new run with another --run_name."
            )
        return None
    if not run.path.is_dir():
        raise DpolabError(f"Nothing to resume: {run.path} does not exist. Drop --resume to start it.")
    checkpoint = run.last_complete_checkpoint()
    if checkpoint is None:
        raise DpolabError(
            f"Nothing to resume: {run.path} has no complete checkpoint-N directory (written every `save_steps`). "
            f"Start again with another --run_name."
        )
    return str(checkpoint)


def locate_model(model: str) -> tuple[str, RunDir | None]:
    """(the model to load, the run it belongs to or None) for a run directory, a checkpoint or any model."""
    path = Path(model)
    run = RunDir(path)
    if run.is_run() and run.final_dir.is_dir():
        return str(run.final_dir), run
    parent = RunDir(path.parent)
    if path.is_dir() and parent.is_run() and parent.metrics_file.is_file():
        return str(path), parent
    if path.is_dir() and run.metrics_file.is_file():
        raise DpolabError(
            f"{path} looks like a run directory but has no config.yaml (or no final/): give --ref and --data."
        )
    if path.name.startswith(CHECKPOINT_PREFIX) and not path.exists():
        names = ", ".join(p.name for p in parent.checkpoints()) if parent.path.is_dir() else ""
        raise DpolabError(f"Checkpoint not found: {path}. Checkpoints of that run: {names or 'none'}.")
    return model, None


def require_run(path: str | Path) -> RunDir:
    """A run directory that `dpolab train` wrote, or a DpolabError saying what the path is instead."""
    run = RunDir(Path(path))
    if not run.is_run():
        raise DpolabError(f"{run.path} is not a dpolab run directory: it has no {CONFIG_FILE}.")
    return run
