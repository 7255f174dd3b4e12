"""`dpolab plan` against the peak memory measured on a GPU (bench/RESULTS.md: one H100, 2026-11-26; one H200,
2026-11-27), recomputed with the plan as it is now: the bench's data rebuilt as bench/train_speed.py builds it, each
row's tokens per micro-batch as the bench counts them (the largest the row met, or what `dpolab train` plans for).

    PYTHONPATH=src python bench/plan_vs_measured.py     # a few seconds on the CPU; no GPU, no model weights
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_speed  # noqa: E402

from dpolab import plan  # noqa: E402

GIB = 2**30
# (card, row, batch, accumulation, checkpointing, reference precomputed, compiled, K/V grouped (varlen_attn), tokens:
# "padded"/"packed" (largest met over 40 steps of 8 pairs), "full met" (largest met over 12 steps of 8 x 2) or the
# CLI's plan, measured peak allocated GiB, measured peak reserved GiB)
MEASURED = [
    ("H100", "TRL default", 8, 1, True, False, False, False, "padded", 10.69, 11.58),
    ("H100", "fast path, eager, batch 8", 8, 1, False, True, False, False, "packed", 17.05, 19.22),
    ("H100", "fast path, compiled layers, batch 8", 8, 1, False, True, True, False, "packed", 13.68, 14.72),
    ("H100", "--preset smoke, eager (8 x 1, reference each step)", 8, 1, False, False, False, False, "smoke plan",
     19.12, 21.70),
    ("H100", "--preset smoke --torch_compile true", 8, 1, False, False, True, False, "smoke plan", 15.52, 16.56),
    ("H100", "--preset full --gpu_memory_gib 24, eager (8 x 2)", 8, 2, False, False, False, False, "full plan",
     20.64, 22.82),
    ("H200", "TRL default", 8, 1, True, False, False, False, "padded", 10.69, 11.58),
    ("H200", "fast path, compiled layers, batch 8", 8, 1, False, True, True, False, "packed", 13.68, 14.46),
    ("H200", "fast path, compiled layers, varlen_attn, batch 8", 8, 1, False, True, True, True, "packed", 13.26,
     14.03),
    ("H200", "--preset full --fit_to_memory false (8 x 2, TRL's checkpointing), compiled", 8, 2, True, True, True,
     False, "full met", 8.91, 9.47),
]  # fmt: skip


def token_counts(layout) -> dict[str, int]:
    return {
        "padded": train_speed.largest_micro_batch(layout, 8, 40, packed=False),
        "packed": train_speed.largest_micro_batch(layout, 8, 40, packed=True, row_multiple=64),
        "full met": train_speed.largest_micro_batch(layout, 8, 24, packed=True, row_multiple=64),
        # what `dpolab train` plans now: the largest micro-batch of 20 simulated runs as long as the row's (40 steps of
        # 8 x 1; the full preset's 12 steps of 8 x 2), on this data
        "smoke plan": plan.batch_token_peak(layout, 8, packed=True, micro_batches=40, row_multiple=64),
        "full plan": plan.batch_token_peak(layout, 8, packed=True, micro_batches=24, row_multiple=64),
    }


def main() -> None:
    layouts = {}
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        train_speed.build_tokenizer(model_dir)
        for card, pairs in (("H100", 320), ("H200", 400)):  # the bench's training pairs on each card's day
            data = train_speed.build_data(Path(work) / card, pairs, scale=1, seed=0)
            layouts[card] = train_speed.token_layout({"model": str(model_dir), "data": str(data)}, 1024)
    layout = layouts["H200"]  # for what the full preset chooses, below
    tokens = {card: token_counts(card_layout) for card, card_layout in layouts.items()}
    model = plan.shape_from_config(plan.KNOWN_CONFIGS["Qwen/Qwen2-0.5B-Instruct"])
    print("| card | setting | tokens per micro-batch | plan allocated GiB | measured | plan reserved GiB | measured | "
          "plan / measured reserved |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for card, name, *settings, kind, allocated, reserved in MEASURED:
        batch, accumulation, checkpointing, precomputed, compiled, grouped = settings
        shape = plan.RunShape(batch=batch, max_length=1024, accumulation=accumulation, checkpointing=checkpointing,
                              weight_bytes=4, autocast=True, precompute_ref=precomputed, tokens=tokens[card][kind],
                              compiled=compiled, grouped_kv=grouped)  # fmt: skip
        planned_allocated = sum(plan.estimate(model, shape).values()) / GIB
        planned_reserved = plan.peak_reserved(model, shape) / GIB
        print(
            f"| {card} | {name} | {tokens[card][kind]:,} ({kind}) | {planned_allocated:.2f} | {allocated:.2f} | "
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
