"""`dpolab sweep RUN_DIR`: the base model and every checkpoint of a run scored on held-out pairs.

Each point is `dpolab eval` with the run's settings (an evaluation already written with the same settings is
reused, so a sweep resumes); the table goes to sweep.csv and the curves to sweep.png.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from dpolab.config import make_config
from dpolab.rundir import EVAL_SUMMARY, SWEEP_CSV, SWEEP_PNG, RunDir, read_json, require_run

COLUMNS = ("step", "name", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
           "chosen_logp_higher")  # fmt: skip


@dataclass
class SweepConfig:
    """Evaluate the base model and each checkpoint-N and final/ of a run: sweep.csv and sweep.png."""

    run_dir: str = field(metadata={"positional": True, "help": "the run directory"})
    data: str | None = field(default=None, metadata={"help": "held-out pairs (default: the run's dataset_name)"})
    split: str | None = field(default=None, metadata={"help": "split (default: the run's eval split)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N pairs"})
    batch_size: int | None = field(default=None, metadata={"help": "eval batch size (default: the run's)"})


def run(config: SweepConfig) -> list[dict]:
    """Evaluate each point once (an eval.json with the same settings is reused), then write the table and plot."""
    from dpolab.evaluate import EvalConfig, evaluate, headline_metrics, resolve, settings_record

    run = require_run(config.run_dir)
    overrides = {key: getattr(config, key) for key in ("data", "split", "limit", "batch_size")
                 if getattr(config, key) is not None}  # fmt: skip
    rows = []
    for name, step, model in sweep_points(run):
        settings = resolve(make_config(EvalConfig, model=model, **overrides), run=run, name=name)
        previous = read_json(run.eval_dir(name) / EVAL_SUMMARY)
        if previous is not None and previous.get("settings") == settings_record(settings):
            print(f"{name}: already evaluated ({run.eval_dir(name) / EVAL_SUMMARY})")
            summary = previous
        else:
            print(f"{name}: evaluating {model}")
            summary = evaluate(settings)
        metrics = headline_metrics(summary)
        rows.append({"step": step, "name": name, **{key: metrics.get(key) for key in COLUMNS[2:]}})
    write_sweep(rows, run)
    return rows


def sweep_points(run: RunDir) -> list[tuple[str, int, str]]:
    """(name, step, model) for the base model, each checkpoint-N in step order, and final/."""
    from dpolab.rundir import checkpoint_step

    points = [("base", 0, run.base_model())]
    points += [(p.name, checkpoint_step(p), str(p)) for p in run.checkpoints()]
    if run.final_dir.is_dir():
        summary = run.read_summary()
        final_step = summary["steps"] if summary else points[-1][1] + 1
        if final_step not in [step for _, step, _ in points]:
            points.append(("final", final_step, str(run.final_dir)))
    return points


def write_sweep(rows: list[dict], run: RunDir) -> None:
    from dpolab.render import plot_sweep, text_table

    with open(run.file(SWEEP_CSV), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep({run.name: rows}, run.file(SWEEP_PNG))
    print(text_table([list(COLUMNS), *([_cell(row[column]) for column in COLUMNS] for row in rows)], align=">"))
    print(f"written: {run.file(SWEEP_CSV)}, {run.file(SWEEP_PNG)}")


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
