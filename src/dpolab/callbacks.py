"""The callbacks dpolab adds to TRL's DPOTrainer: the metrics file, a live progress bar, and the run guard
(Ctrl-C saves a checkpoint; non-finite values stop the run without saving one)."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from dpolab.rundir import append_jsonl


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train and eval) to metrics.jsonl, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


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
