"""What one training step asks of the host, counted on the CPU: the operators that make the host wait for a GPU
(`.item()`, `if tensor`, boolean indexing, ...) and every other operator call, by the Python code that issued it.

    python bench/host_ops.py --out DIR       # TRL's default and dpolab's fast path, the bench's CPU workload

Why: the H100 profile of 2026-11-26 (bench/RESULTS.md) found the fast path's step bound by the host: ~2,050 kernel
launches and 32 waits for the GPU per step, with the GPU busy ~60% of it. The same Python code issues the same
operators on any device, so a `TorchDispatchMode` on the CPU counts them exactly, by caller: the operators that
synchronize on CUDA (SYNCING says why each does) and all the others (each a kernel launch or more on a GPU, where it
runs outside compiled code). What it cannot see: copies between host and device (no operator on CPU tensors:
`.tolist()`, and the batch's copy to the GPU, which waits for the queue unless `non_blocking`), what compiled graphs
launch (the step here is eager; the decoder layers' share is counted apart, as the fast path's `torch.compile`
turns it into its own kernels on CUDA). TRL's fused LM head compacts the positions it scores with a boolean mask
only on devices with Triton (`trl/trainer/utils.py` `_fused_forward`, `compact`): the steps are counted with it
compacting on the CPU too (`models.score_completion_tokens_only`), as it does on CUDA. Views (no kernel) are left
out of the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import train_speed  # the bench's world (tokenizer, model, data) and its trainers

FIRST_STEP, STEPS = 4, 3  # optimizer steps counted (1-based): after the first steps' one-off work
# Operators that make the host wait for a CUDA device, and why: their result's value or size is needed on the host
SYNCING = {
    "aten._local_scalar_dense": "a value on the host: .item(), float(t), `if t > 0`",
    "aten.nonzero": "its size depends on the values",
    "aten.masked_select": "its size depends on the mask",
    "aten.unique": "its size depends on the values",
    "aten._unique2": "its size depends on the values",
    "aten.repeat_interleave": "its size depends on the values",
}
BOOLEAN_INDEXING = ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default")  # a nonzero inside


def sync_reason(func, args) -> str | None:
    """Why `func(*args)` would make the host wait for a CUDA device, or None."""
    import torch

    name = f"aten.{func._opname}"
    if name in SYNCING:
        return SYNCING[name]
    if str(func) in BOOLEAN_INDEXING:
        indices = args[1] if len(args) > 1 else []
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean indexing: a nonzero inside"
    return None


def short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "src", "bench"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    return "/".join(parts[-2:])


def in_torch(filename: str) -> bool:
    """torch's own machinery, which is never the caller worth naming (its optimizers and clipping are)."""
    return "/torch/" in filename and "/torch/optim/" not in filename and "/torch/nn/utils/" not in filename


class Census:
    """A TorchDispatchMode counting operator calls by part of the step and syncing calls by Python line."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls, self.syncs = collections.Counter(), collections.Counter()
        self.layer_depth = self.backward_layers = 0
        census = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                census.record(func, args)
                return func(*args, **(kwargs or {}))

        self.mode, self.torch = Mode(), torch

    def record(self, func, args) -> None:
        reason = sync_reason(func, args)
        if func.is_view and reason is None:
            return
        frame, frames = sys._getframe(2), []
        while frame is not None:
            frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
        line = next((f"{short(f)}:{n} {name}" for f, n, name in frames if not in_torch(f)), "?")
        self.calls[(self.part(frames), line)] += 1
        if reason is not None:
            self.syncs[(line, reason)] += 1

    def part(self, frames) -> str:
        files = [f for f, _, _ in frames]
        if self.layer_depth:
            return "decoder layers, forward"
        if self.backward_layers:
            return "decoder layers, backward"
        if any("/torch/optim/" in f for f in files):
            return "optimizer step"
        if any("/torch/nn/utils/" in f for f in files):
            return "gradient clipping"
        if any(name in ("pack_batch", "torch_call") for _, _, name in frames):  # dpolab's and TRL's collators
            return "collation (host tensors on a GPU too)"
        if any(f.endswith("torch/autograd/__init__.py") or f.endswith("torch/_tensor.py") for f in files):
            return "backward outside the layers"
        return "forward, loss, metrics, logging (eager)"

    def watch_layers(self, layers) -> None:
        """Mark the decoder layers' operators: forward hooks around each layer's forward, full backward hooks
        around its backward (they add identity nodes, no kernels)."""

        def enter(*_):
            self.layer_depth += 1

        def leave(*_):
            self.layer_depth -= 1

        def enter_backward(*_):
            self.backward_layers += 1

        def leave_backward(*_):
            self.backward_layers -= 1

        for layer in layers:
            layer.register_forward_pre_hook(enter)
            layer.register_forward_hook(leave)
            layer.register_full_backward_pre_hook(enter_backward)
            layer.register_full_backward_hook(leave_backward)

    def callback(self):
        """A TrainerCallback counting from the start of step FIRST_STEP to the start of the step after the last
        counted one: each counted step's forward, backward, optimizer step and logging."""
        from transformers import TrainerCallback

        census = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == FIRST_STEP:
                    census.mode.__enter__()
                elif state.global_step + 1 == FIRST_STEP + STEPS:
                    census.mode.__exit__(None, None, None)

        return Callback()

    def report(self, row: str) -> dict:
        by_part = collections.Counter()
        for (part, _), count in self.calls.items():
            by_part[part] += count
        return {
            "row": row,
            "operator_calls_per_step": {part: count / STEPS for part, count in by_part.most_common()},
            "syncs_per_step": sum(self.syncs.values()) / STEPS,
            "syncs": [
                {"line": line, "why": why, "per_step": count / STEPS} for (line, why), count in self.syncs.most_common()
            ],
            "top_callers": [
                {"part": part, "line": line, "per_step": count / STEPS}
                for (part, line), count in self.calls.most_common(40)
            ],
        }


def census_of(row: str, world: dict, work: Path) -> dict:
    """Train `row` (TRL's default or a dpolab fast-path row) for FIRST_STEP + STEPS steps, counting."""
    from dpolab import packing
    from dpolab.models import load_tokenizer, score_completion_tokens_only

    args = argparse.Namespace(work=str(work), row=row, steps=FIRST_STEP + STEPS, device="cpu")
    trainer = train_speed.row_trainer(world, args, load_tokenizer(world["model"]))
    census = Census()
    census.watch_layers(packing.decoder_layers(trainer.model))
    trainer.add_callback(census.callback())
    with score_completion_tokens_only():  # TRL's head as on CUDA
        trainer.train()
    return census.report(row)


def text(report: dict) -> str:
    calls = sum(report["operator_calls_per_step"].values())
    lines = [f"## {report['row']}: per optimizer step (steps {FIRST_STEP}-{FIRST_STEP + STEPS - 1})", "",
             f"operator calls (views left out), {calls:.0f} in all:"]  # fmt: skip
    lines += [f"  {count:7.1f}  {part}" for part, count in report["operator_calls_per_step"].items()]
    lines += ["", f"calls that make the host wait for a CUDA device: {report['syncs_per_step']:.1f}"]
    lines += [f"  {one['per_step']:5.1f}  {one['line']}  ({one['why']})" for one in report["syncs"]]
    lines += ["", "most calls, by line:"]
    lines += [f"  {one['per_step']:6.1f}  {one['line']}  [{one['part']}]" for one in report["top_callers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--rows", default="trl-default,dpolab-fast")
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "host-ops-work"
    train_speed.clear_previous_results(work)
    work.mkdir(parents=True, exist_ok=True)
    world = train_speed.build_world(work, "cpu", pairs=8 * (FIRST_STEP + STEPS) + 16)
    reports = [census_of(row, world, work) for row in args.rows.split(",")]
    (out / "host_ops.json").write_text(json.dumps(reports, indent=2))
    (out / "host_ops.md").write_text("\n".join(text(report) for report in reports))
    print("\n".join(text(report) for report in reports))


if __name__ == "__main__":
    main()
