"""`dpolab train`: config -> run directory -> model location -> data -> TRL's DPOTrainer -> final/ + summary.

The run directory `runs_dir/run_name/` ends up holding config.yaml, metrics.jsonl, TensorBoard events under
tensorboard/, checkpoint-N/, final/ and summary.json. An existing run is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml
from transformers import ProgressCallback, TrainerCallback

from dpolab.config import TrainConfig, resolved_config
from dpolab.errors import DpolabError

# The curves people watch, in TRL's own metric names.
KEY_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
# For "best" in summary.json: whether a higher value is better.
HIGHER_IS_BETTER = {"loss": False, "rewards/accuracies": True, "rewards/margins": True}


def run(config: TrainConfig) -> dict:
    """Train and return the summary written to summary.json.

    Under `accelerate launch` every process runs this; only the main process writes the run directory.
    """
    from accelerate import PartialState

    process = PartialState()  # already set up by DPOConfig; a single process when not launched
    run_dir = config.run_dir
    resume_from = find_resume_checkpoint(run_dir, config.script.resume)
    process.wait_for_everyone()  # every process has checked before the main one creates the directory

    # Where the model is, before reading data (a missing model is the first thing to know); no weights yet.
    from dpolab.models import load_tokenizer, resolve_model

    model_path = resolve_model(
        config.model.model_name_or_path,
        revision=config.model.model_revision,
        trust_remote_code=config.training.trust_remote_code,
        allow_pickle=config.script.allow_pickle_weights,
    )
    train_pairs, eval_pairs = load_train_eval(config)
    tokenizer = load_tokenizer(
        model_path, revision=config.model.model_revision, trust_remote_code=config.training.trust_remote_code
    )
    check_template(train_pairs, tokenizer, config.model.model_name_or_path)
    print(describe_data(train_pairs, eval_pairs), flush=True)

    from dpolab.versions import git_commit, installed_versions

    provenance = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": invoked_command(),
        "config_source": config.source,
        "model_path": model_path,
        "data": {"train": train_pairs.source, "eval": eval_pairs.source if eval_pairs else None},
        "data_format": train_pairs.format,
        "versions": installed_versions(),
        "git_commit": git_commit(),
    }
    if process.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=config.script.resume)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved_config(config, provenance), sort_keys=False))
        if resume_from:
            truncate_metrics(run_dir / "metrics.jsonl", checkpoint_step(resume_from))
            print(f"Resuming {run_dir} from {Path(resume_from).name}", flush=True)
    process.wait_for_everyone()
    try:
        trainer = build_trainer(config, model_path, tokenizer, train_pairs, eval_pairs)
    except DpolabError:
        if not config.script.resume and process.is_main_process:  # a run that never started leaves nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    training = config.training
    guard = RunGuard()
    trainer.add_callback(guard)
    started = time.time()
    with guard.catching_ctrl_c(), score_completion_tokens_only():
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    if guard.non_finite is not None:
        raise DpolabError(non_finite_message(guard.non_finite, run_dir, training.learning_rate))
    if guard.interrupted:
        last = last_complete_checkpoint(run_dir)
        print(
            f"\nInterrupted at step {trainer.state.global_step}; checkpoint saved: {last}.\n"
            f"Resume with: {invoked_command() or 'the same command'}" + ("" if config.script.resume else " --resume"),
            file=sys.stderr,
            flush=True,
        )
        raise KeyboardInterrupt
    # As TRL: evaluation follows eval_strategy; a run that evaluates gets a last evaluation at its final step.
    last_step = trainer.state.global_step
    if (
        eval_pairs is not None
        and training.eval_strategy != "no"
        and not evaluated_at(trainer.state.log_history, last_step)
    ):
        with score_completion_tokens_only():
            trainer.evaluate()

    final_dir = run_dir / "final"
    trainer.save_model(str(final_dir))  # every process takes part (sharded models); the main one writes
    summary = {}
    if process.is_main_process:
        tokenizer.save_pretrained(str(final_dir))
        # Trainer pickles its arguments beside the weights; config.yaml records them, and final/ stays pickle-free.
        (final_dir / "training_args.bin").unlink(missing_ok=True)
        if config.script.merge_lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(final_dir / "merged"))
            tokenizer.save_pretrained(str(final_dir / "merged"))
        summary = summarize(
            read_jsonl(run_dir / "metrics.jsonl"),
            steps=trainer.state.global_step,
            epochs=trainer.state.epoch,
            runtime_s=time.time() - started,
            train_metrics=train_output.metrics,
        )
        summary.update(
            run_dir=str(run_dir),
            final_model=str(final_dir),
            checkpoints=sorted(p.name for p in run_dir.glob("checkpoint-*")),
            train_pairs=len(train_pairs.dataset),
            eval_pairs=len(eval_pairs.dataset) if eval_pairs else 0,
        )
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        print(format_summary(summary), flush=True)
    process.wait_for_everyone()
    return summary


def invoked_command() -> str | None:
    """The `dpolab ...` command line this process runs, when it was started from the CLI."""
    return " ".join(["dpolab", *sys.argv[1:]]) if sys.argv and "dpolab" in sys.argv[0] else None


def find_resume_checkpoint(run_dir: Path, resume: bool) -> str | None:
    """The checkpoint to resume from (None for a new run); an existing run is never overwritten."""
    if not resume:
        if run_dir.exists():
            raise DpolabError(
                f"Run directory {run_dir} already exists and is never overwritten. Continue it with --resume "
                f"(from its last checkpoint) or start a new run with another --run_name."
            )
        return None
    if not run_dir.is_dir():
        raise DpolabError(f"Nothing to resume: {run_dir} does not exist. Drop --resume to start it.")
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise DpolabError(
            f"Nothing to resume: {run_dir} has no complete checkpoint-N directory (written every `save_steps`). "
            f"Start again with another --run_name."
        )
    return str(checkpoint)


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json (written last by Trainer) is whole.

    A process killed while saving leaves a checkpoint without it, or with half of it; that one is skipped.
    """
    for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return checkpoint
    return None


def load_train_eval(config: TrainConfig):
    """Train pairs and eval pairs (an eval split, a seeded held-out fraction, or None)."""
    from dpolab.data import load_pairs, split_holdout

    script = config.script
    columns = dict(
        dataset_config=script.dataset_config,
        prompt_column=script.prompt_column,
        chosen_column=script.chosen_column,
        rejected_column=script.rejected_column,
    )
    train_pairs = load_pairs(script.dataset_name, script.train_split, **columns)
    if script.eval_split:
        return train_pairs, load_pairs(script.dataset_name, script.eval_split, **columns)
    if script.eval_holdout:
        return split_holdout(train_pairs, script.eval_holdout, config.training.seed)
    return train_pairs, None


def check_template(pairs, tokenizer, model_name: str) -> None:
    """Plain strings given to a chat model skip its template: legal in TRL, and nearly always a mistake."""
    if pairs.is_conversational:
        if tokenizer.chat_template is None:
            raise DpolabError(
                f"The data are message lists ({pairs.format}) but the tokenizer of {model_name} has no chat "
                f"template to render them. Use a chat/instruct model, or give prompt/chosen/rejected as strings."
            )
        return
    if tokenizer.chat_template is not None:
        print(
            "\n" + "!" * 100 + f"\nWARNING: {model_name} has a chat template, but the data are plain strings "
            f"({pairs.format}).\nTRL trains on the raw text WITHOUT the template, so the model learns on prompts "
            "unlike the ones it sees in chat.\nGive prompt/chosen/rejected as message lists [{role, content}] to have "
            "the template applied.\n" + "!" * 100 + "\n",
            file=sys.stderr,
            flush=True,
        )


def describe_data(train_pairs, eval_pairs) -> str:
    lines = [f"Data: {train_pairs.format}", f"  train: {len(train_pairs.dataset)} pairs from {train_pairs.source}"]
    if eval_pairs is not None:
        lines.append(f"  eval:  {len(eval_pairs.dataset)} pairs from {eval_pairs.source}")
    for pairs in (train_pairs, eval_pairs):
        if pairs is not None and pairs.identical_rows:
            shown = ", ".join(map(str, pairs.identical_rows[:5])) + (", ..." if len(pairs.identical_rows) > 5 else "")
            lines.append(
                f"  dropped {len(pairs.identical_rows)} pair(s) with chosen == rejected "
                f"from {pairs.source} (rows {shown})"
            )
    return "\n".join(lines)


def build_trainer(config: TrainConfig, model_path: str, tokenizer, train_pairs, eval_pairs):
    """TRL's DPOTrainer as `trl/scripts/dpo.py` builds it, plus dpolab's logging callbacks."""
    from trl import DPOTrainer, get_peft_config, get_quantization_config

    training, model_args = config.training, config.model
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training.model_init_kwargs or {})
    training.model_init_kwargs = model_init_kwargs
    # transformers' TensorBoard callback would nest events under output_dir/runs/<date>; keep them in one place.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(config.run_dir / "tensorboard")

    trainer = DPOTrainer(
        model=model_path,
        args=training,
        train_dataset=train_pairs.dataset,
        eval_dataset=eval_pairs.dataset if eval_pairs is not None else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=[MetricsFileCallback(config.run_dir / "metrics.jsonl")],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LiveProgressCallback())
    for name, pairs, prepared in (
        ("train", train_pairs, trainer.train_dataset),
        ("eval", eval_pairs, trainer.eval_dataset),
    ):
        if pairs is not None:
            check_dropped(name, len(pairs.dataset), len(prepared), training.max_length)
    return trainer


def check_dropped(name: str, given: int, kept: int, max_length: int | None) -> None:
    """TRL silently drops pairs whose prompt alone reaches max_length; all of them dropped is an error."""
    if kept == 0:
        raise DpolabError(
            f"All {given} {name} pairs were dropped: in every one the prompt alone reaches max_length={max_length} "
            f"tokens, leaving no completion to learn from. Raise --max_length (`dpolab data check` shows the lengths)."
        )
    if kept < given:
        print(f"Note: TRL dropped {given - kept} of {given} {name} pairs (prompt alone >= max_length={max_length}).")


# --- callbacks --------------------------------------------------------------------------------------------------


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train and eval) to metrics.jsonl, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def score_completion_tokens_only():
    """Run TRL's fused LM head on completion positions only, on the CPU too.

    TRL 1.16 compacts to the positions it scores only on Triton devices (elsewhere every position, prompt and
    padding included, goes through the vocabulary projection and is then zeroed); on the CPU that projection
    dominates small models with large vocabularies. The log-probs are the same (bench/RESULTS.md).
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


class RunGuard(TrainerCallback):
    """Stops cleanly: on Ctrl-C after saving a checkpoint, and on a non-finite loss, gradient or weights
    without saving one (a NaN checkpoint is removed, so the last checkpoint left is a good one)."""

    def __init__(self):
        self.interrupted = False
        self.non_finite: tuple[int, str, float] | None = None

    @contextlib.contextmanager
    def catching_ctrl_c(self):
        def on_sigint(signum, frame):
            if self.interrupted:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.interrupted = True
            print("\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to stop at once) ...",
                  file=sys.stderr, flush=True)  # fmt: skip

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self.non_finite = self.non_finite or (state.global_step, key, value)
                control.should_save = False
                control.should_training_stop = True

    def on_save(self, args, state, control, model=None, **kwargs):
        import torch

        if model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
            shutil.rmtree(Path(args.output_dir) / f"checkpoint-{state.global_step}", ignore_errors=True)
            self.non_finite = self.non_finite or (state.global_step, "weights", float("nan"))
            control.should_training_stop = True


def non_finite_message(non_finite: tuple[int, str, float], run_dir: Path, learning_rate: float) -> str:
    step, key, value = non_finite
    last = last_complete_checkpoint(run_dir)
    where = (
        f"The last good checkpoint is {last}: continue from it with --resume and a lower --learning_rate "
        f"(e.g. {learning_rate / 10:g})."
        if last
        else "No checkpoint was saved before it; start a new run (another --run_name)."
    )
    return (
        f"Training stopped at step {step}: {key} is {value}. Nothing was saved as final/. {where} "
        f"Also worth trying: max_grad_norm 1.0, warmup_steps 0.1, bf16 rather than fp16, and `dpolab data check` "
        f"for extreme lengths."
    )


class LiveProgressCallback(ProgressCallback):
    """transformers' progress bar, showing live loss/accuracy/margin instead of printing each log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(
                loss=f"{logs['loss']:.4f}",
                acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}",
                margin=f"{logs.get('rewards/margins', float('nan')):.3f}",
                refresh=False,
            )
        if "eval_loss" in logs:
            self.training_bar.write(
                f"eval @ step {state.global_step}: loss {logs['eval_loss']:.4f}  "
                f"acc {logs.get('eval_rewards/accuracies', float('nan')):.3f}  "
                f"margin {logs.get('eval_rewards/margins', float('nan')):.4f}"
            )


# --- run-directory files --------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file the workflows wrote (none if it is missing); a last line cut off by a crash
    mid-write is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: a resumed run logs the later steps again."""
    if path.is_file():
        kept = [record for record in read_jsonl(path) if record["step"] <= step]
        write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def evaluated_at(log_history: list[dict], step: int) -> bool:
    return any("eval_loss" in record and record.get("step") == step for record in log_history)


def summarize(records: list[dict], *, steps: int, epochs: float, runtime_s: float, train_metrics: dict) -> dict:
    """summary.json from the metric records: last and best values of the key curves, train and eval."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    final = {key: train[-1][key] for key in KEY_METRICS if train and key in train[-1]}
    final_eval = {key: evals[-1][f"eval_{key}"] for key in KEY_METRICS if evals and f"eval_{key}" in evals[-1]}
    best = {}
    for prefix, series in (("", train), ("eval_", evals)):
        for key, higher in HIGHER_IS_BETTER.items():
            values = [(r[prefix + key], r["step"]) for r in series if _finite(r.get(prefix + key))]
            if values:
                value, step = (max if higher else min)(values, key=lambda pair: pair[0])
                best[prefix + key] = {"value": value, "step": step}
    return {
        "steps": steps,
        "epochs": epochs,
        "runtime_s": round(runtime_s, 1),
        "pairs_per_s": train_metrics.get("train_samples_per_second"),
        "steps_per_s": train_metrics.get("train_steps_per_second"),
        "final": final,
        "final_eval": final_eval,
        "best": best,
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_summary(summary: dict) -> str:
    rows = [
        f"Run finished: {summary['run_dir']}",
        f"  {summary['steps']} steps, {summary['epochs']:.2f} epochs in {summary['runtime_s']:.0f} s"
        + (f" ({summary['pairs_per_s']:.2f} pairs/s)" if summary.get("pairs_per_s") else ""),
        f"  {'metric':<22}{'train (last)':>14}{'eval (last)':>14}",
    ]
    for key in KEY_METRICS:
        train = summary["final"].get(key)
        evaluated = summary["final_eval"].get(key)
        rows.append(f"  {key:<22}{_fmt(train):>14}{_fmt(evaluated):>14}")
    rows.append(f"  model: {summary['final_model']}  (AutoModelForCausalLM.from_pretrained)")
    rows.append(f"  curves: tensorboard --logdir {Path(summary['run_dir']) / 'tensorboard'}  |  metrics.jsonl")
    return "\n".join(rows)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
