"""The callbacks dpolab adds to TRL's DPOTrainer: how far the weights moved, the metrics file, a live progress
bar, the run guard (Ctrl-C saves a checkpoint; non-finite values stop the run without saving one), and gradients
allocated before the backward passes of a step under CUDA graphs."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from dpolab.rundir import FORWARD_METRIC_PREFIXES, append_jsonl


class MetricsFileCallback(TrainerCallback):
    """Appends every log record (train and eval) to metrics.jsonl, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


def non_finite_value(logs: dict, routine_overflow: bool = False) -> tuple[str, float] | None:
    """The first non-finite value the trainer logged, or None.

    transformers' `logging_nan_inf_filter` (on by default) replaces a NaN step loss before it is logged, so the
    loss alone cannot show a NaN: TRL's DPO metrics (rewards/*, logps/*, ...) are checked first. A non-finite
    grad_norm is routine when fp16's loss scaler skipped the step (`routine_overflow`): the scaler lowers its
    scale and the weights are untouched.
    """
    metric_keys = [key for key in logs if key.removeprefix("eval_").startswith(FORWARD_METRIC_PREFIXES)]
    keys = [*metric_keys, "loss", "eval_loss"] + ([] if routine_overflow else ["grad_norm"])
    for key in keys:
        value = logs.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return key, value
    return None


class RunGuard(TrainerCallback):
    """Stops cleanly: on Ctrl-C after saving a checkpoint, and on a non-finite value the trainer computed (its DPO
    metrics, the gradient norm, the weights at a save) without saving one (a NaN checkpoint is removed, so the
    last checkpoint left is a good one). fp16 steps the loss scaler skipped are counted, not fatal."""

    def __init__(self, step_was_skipped=lambda: False):
        self.interrupted = False
        self.non_finite: tuple[int, str, float] | None = None
        self.step_was_skipped = step_was_skipped  # the accelerator's: did fp16's scaler skip the last step?
        self.skipped_steps = 0
        self.last_step_skipped = False

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
        self.last_step_skipped = bool(self.step_was_skipped())
        self.skipped_steps += self.last_step_skipped
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        problem = non_finite_value(logs or {}, routine_overflow=bool(args.fp16 and self.last_step_skipped))
        if problem is not None:
            self.non_finite = self.non_finite or (state.global_step, *problem)
            control.should_save = False
            control.should_training_stop = True

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and not weights_finite(model):
            shutil.rmtree(Path(args.output_dir) / f"checkpoint-{state.global_step}", ignore_errors=True)
            self.non_finite = self.non_finite or (state.global_step, "weights", float("nan"))
            control.should_training_stop = True


def weights_finite(model) -> bool:
    import torch

    return all(torch.isfinite(p).all() for p in model.parameters())


class WeightMovementCallback(TrainerCallback):
    """Adds `weights/changed_share` and `weights/relative_change` to the training logs: over a fixed sample of
    each trainable tensor, the share of weights that changed since training (re)started and the relative size of
    the change. A run whose updates round away (bf16 weights, plain AdamW, small learning rate) shows ~0 here.

    Measured at most every `every` optimizer steps (and at the end): the sample is one small gather per tensor,
    ~300 kernel launches for a 24-layer model, a few ms that a launch-bound GPU step logged every step would pay
    each time."""

    def __init__(self, every: int = 10):
        self.samples = []  # (parameter, flat indices)
        self.initial = None
        self.every, self.measured_at = every, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from dpolab.weights import gather_sample, sample_indices

        parameters = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
        self.samples = [(p, sample_indices(p.numel()).to(p.device)) for p in parameters]
        self.initial = gather_sample(self.samples) if self.samples else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        from dpolab.weights import gather_sample, movement

        if not self.samples or logs is None:
            return
        due = "loss" in logs and (self.measured_at is None or state.global_step - self.measured_at >= self.every)
        if due or "train_runtime" in logs:  # the trainer's closing log: the movement at the very end
            logs.update(movement(self.initial, gather_sample(self.samples)))
            self.measured_at = state.global_step


class GradientsAllocatedCallback(TrainerCallback):
    """Gives every trainable parameter a zero `.grad` at the start of each optimizer step, so that each backward
    pass adds into it in place. Why, under CUDA graphs (`torch_compile_mode reduce-overhead`) with gradient
    accumulation: where `.grad` is unset, autograd takes the backward graph's output tensor as the gradient, that
    tensor lives in the graphs' memory pool, and the next micro-batch's replay reclaims the pool, so accumulating
    into it fails ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run",
    pytorch/pytorch#169545, open). Zero plus the first gradient is that gradient: the same values."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        import torch

        for parameter in model.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)


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
