"""`dpolab plan` against the peak memory measured on an H100 (bench/RESULTS.md, 2026-11-26), recomputed with the
plan as it is now: the bench's data rebuilt as bench/train_speed.py builds it, each row's tokens per micro-batch as
the bench counts them (the largest the row met, or the 99.9th percentile that `dpolab train` plans for).

    PYTHONPATH=src python bench/plan_vs_h100.py     # a few seconds on the CPU; no GPU, no model weights
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_speed  # noqa: E402

from dpolab import plan  # noqa: E402

GIB = 2**30
# (row, batch, accumulation, checkpointing, reference precomputed, compiled, tokens: "padded"/"packed" (largest met
# over 40 steps of 8 pairs) or the CLI's plan, measured peak allocated GiB, measured peak reserved GiB)
MEASURED = [
    ("TRL default", 8, 1, True, False, False, "padded", 10.69, 11.58),
    ("fast path, eager, batch 8", 8, 1, False, True, False, "packed", 17.05, 19.22),
    ("fast path, compiled layers, batch 8", 8, 1, False, True, True, "packed", 13.68, 14.72),
    ("--preset smoke, eager (8 x 1, reference each step)", 8, 1, False, False, False, "smoke plan", 19.12, 21.70),
    ("--preset smoke --torch_compile true", 8, 1, False, False, True, "smoke plan", 15.52, 16.56),
    ("--preset full --gpu_memory_gib 24, eager (8 x 2)", 8, 2, False, False, False, "full plan", 20.64, 22.82),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        train_speed.build_tokenizer(model_dir)
        data = train_speed.build_data(Path(work) / "data", 320, scale=1, seed=0)
        layout = train_speed.token_layout({"model": str(model_dir), "data": str(data)}, 1024)
    model = plan.shape_from_config(plan.KNOWN_CONFIGS["Qwen/Qwen2-0.5B-Instruct"])
    tokens = {
        "padded": train_speed.largest_micro_batch(layout, 8, 40, packed=False),
        "packed": train_speed.largest_micro_batch(layout, 8, 40, packed=True, row_multiple=64),
        # what `dpolab train` plans now: the largest micro-batch of 20 simulated runs as long as the row's (40 steps of
        # 8 x 1; the full preset's 12 steps of 8 x 2), on this data
        "smoke plan": plan.batch_token_peak(layout, 8, packed=True, micro_batches=40, row_multiple=64),
        "full plan": plan.batch_token_peak(layout, 8, packed=True, micro_batches=24, row_multiple=64),
    }
    print("| setting | tokens per micro-batch | plan allocated GiB | measured | plan reserved GiB | measured | plan / "
          "measured reserved |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for name, batch, accumulation, checkpointing, precomputed, compiled, kind, allocated, reserved in MEASURED:
        shape = plan.RunShape(batch=batch, max_length=1024, accumulation=accumulation, checkpointing=checkpointing,
                              weight_bytes=4, autocast=True, precompute_ref=precomputed, tokens=tokens[kind],
                              compiled=compiled)  # fmt: skip
        planned_allocated = sum(plan.estimate(model, shape).values()) / GIB
        planned_reserved = plan.peak_reserved(model, shape) / GIB
        print(
            f"| {name} | {tokens[kind]:,} ({kind}) | {planned_allocated:.2f} | {allocated:.2f} | "
            f"{planned_reserved:.2f} | {reserved:.2f} | {100 * (planned_reserved / reserved - 1):+.1f}% |"
        )
    # what a user's --preset full --gpu_memory_gib 24 chooses on data of these lengths: a whole epoch of
    # ultrafeedback_binarized's 62,135 pairs (reference precomputed), and the bench's cli-full row (12 steps of 16)
    for name, pairs_seen in (("a whole epoch, 62,135 pairs", 62_135), ("cli-full's 12 steps", 12 * 16)):
        shape = plan.RunShape(batch=16, max_length=1024, accumulation=1, checkpointing=False, weight_bytes=4,
                              autocast=True, precompute_ref=True, compiled=True)  # fmt: skip
        chosen = plan.fit(model, shape, 24 * GIB, lambda b, seen=pairs_seen: plan.batch_token_peak(
            layout, b, True, micro_batches=-(-seen // b), row_multiple=64))  # fmt: skip
        print(f"\n--preset full --gpu_memory_gib 24 on this data, {name}: {chosen.batch} x {chosen.accumulation}, "
              f"checkpointing {chosen.checkpointing}, {chosen.tokens:,} tokens, planned "
              f"{plan.peak_reserved(model, chosen) / GIB:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
