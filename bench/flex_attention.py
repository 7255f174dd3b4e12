"""FlexAttention alone on the fast path's packed rows: do its kernels cost what the block mask lets through?

    python bench/flex_attention.py --device cuda      # also the `flex-attention` row of bench/device.sh

Why: the H100 profile of 2026-11-26 (bench/RESULTS.md) had FlexAttention's forward at 433 us a layer and its backward
at 282 us on the bench's packed rows, 17 ms of a step's 68 ms of kernels. On rows of the bench's workload (8 pairs,
~4,900 tokens) dpolab's block mask lets each of ~39 query blocks of 128 visit ~3.9 key blocks (counted on the CPU with
`packing.allowed_per_block`): ~9 GFLOP a layer forward, ~25 us at 350 TFLOP/s, and a mask visiting every key block
(no sparsity at all) would cost ~10x that, about what was measured. This times one layer's attention on such a row,
compiled as the compiled layer runs it, and variants that say where the time goes:

- `transformers, dpolab mask, dynamic`: transformers 5.24's `flex_attention_forward` (K/V repeated to Qwen2-0.5B's 14
  query heads, as it does when the head count is not a power of two; the log-sum-exp returned), with dpolab's block
  mask, under `torch.compile(dynamic=True)`: what each compiled decoder layer runs;
- `... static`: the same compiled for this row's length only; `... forward tiles 64 x 64`: the forward kernel with
  query tiles of 64 rather than its default (twice the programs in a grid of ~550, each with a short loop);
- `varlen_attn`: no FlexAttention at all: PyTorch's FlashAttention kernel for variable-length sequences, each pair
  computed as two sequences (prompt + chosen; the rejected answer over the prompt's keys read again), K/V grouped as
  they are (`packing.varlen_attention`, `--attn_implementation varlen_attn`); its output against the first variant's
  is the GPU's check of that layout and of the kernel's bottom-right causal mask;
- `grouped K/V`: `flex_attention(..., enable_gqa=True)` on the 2 K/V heads (the bench's GQA rows);
- `causal mask` and `no mask`: the same call with `create_block_mask`'s causal mask and with none (every key block):
  the time a mask with no pair structure, and one with no sparsity, costs;
- the cost of the rule inside the kernels: in the blocks a mask leaves partial (~3.1 of the 3.9 a query block visits)
  the kernels evaluate `mask_mod` on every (query, key) of each tile, here four loads of int64 ids (pair and segment
  of the query and of the key). `dpolab blocks, causal rule`: dpolab's blocks with `k <= q` alone (no loads; another
  attention, so no output check); `dpolab mask, int32 ids`: the same rule on int32 ids; `dpolab mask, one int32 code`:
  the same rule on one code per position (pair x 4 + segment: two loads). The last two must give the first's output;
  if either is much faster, `packing.block_mask` takes its form.

Each: forward and backward in microseconds (CUDA events, mean of REPEATS after warm-up), the key blocks its mask visits
and the forward's TFLOP/s over them. On the CPU (a check of the script) the rows are 8x shorter and the backend is
aot_eager (inductor's CPU FlexAttention template is not used here).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64  # Qwen2-0.5B
PAIRS, REPEATS, SEED = 8, 10, 0


def packed_row(device: str, scale: int):
    """One packed row of PAIRS pairs with the bench's lengths (prompts 35-370 tokens plus ~10 of chat template,
    answers 35-740 plus 3 end tokens, log-uniform; max_length 1024, TRL's keep_start truncation): pair, segment [T]."""
    from dpolab import packing

    rng = random.Random(SEED)

    def length(low, high):
        return int(round(low * (high / low) ** rng.random())) // scale

    examples = []
    for _ in range(PAIRS):
        prompt = length(35, 370) + 10 // scale
        room = 1024 // scale - prompt
        examples.append({"prompt_ids": [5] * prompt, "chosen_ids": [6] * min(length(35, 740) + 3, room),
                         "rejected_ids": [7] * min(length(35, 740) + 3, room)})  # fmt: skip
    batch = {
        key: value.to(device) for key, value in packing.pack_batch(examples, 1024 // scale, 0, varlen=True).items()
    }
    return batch["packed_pair"][0], batch["packed_segment"][0], packing.VarlenRow.from_batch(batch)


SAME_ATTENTION = ("dpolab", "dpolab int32", "dpolab code")  # masks of one rule: their outputs are compared


def masks(pair, segment) -> dict:
    """The block masks the variants run with (None: no mask, every key block)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    from dpolab import packing

    length = pair.numel()
    causal = create_block_mask(lambda b, h, q, k: k <= q, None, None, length, length, device=pair.device.type)
    dpolab = packing.block_mask(pair, segment)

    def with_rule(mask_mod):  # dpolab's blocks, another rule inside the partial ones
        return BlockMask.from_kv_blocks(dpolab.kv_num_blocks, dpolab.kv_indices, dpolab.full_kv_num_blocks,
                                        dpolab.full_kv_indices, BLOCK_SIZE=dpolab.BLOCK_SIZE, mask_mod=mask_mod,
                                        seq_lengths=dpolab.seq_lengths)  # fmt: skip

    # pair x 4 + segment: the same pair and segment = the same code; the same pair's prompt = the code with its
    # segment bits cleared (padding: pair -1, segment 0, code -4, attends to padding as the rule has it)
    code = (pair * 4 + segment).int()

    def one_code(batch, head, q, k):
        return (k <= q) & ((code[k] == code[q]) | (code[k] == (code[q] & -4)))

    return {"dpolab": dpolab, "dpolab int32": packing.block_mask(pair.int(), segment.int()),
            "dpolab code": with_rule(one_code), "dpolab blocks, causal rule": with_rule(lambda b, h, q, k: k <= q),
            "causal": causal, "none": None}  # fmt: skip


def visited_blocks(block_mask, length: int) -> int:
    """Query block x key block pairs the kernels compute: partial and full blocks, or all of them without a mask."""
    if block_mask is None:
        blocks = -(-length // 128)
        return blocks * blocks
    return int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum())


def variants(backend: str, sequences) -> dict:
    """name -> (attention function (q, k, v, block_mask) -> output, mask name), each compiled as named; `sequences`:
    the row as `varlen_attn` computes it (packing.varlen_layout)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.flex_attention import flex_attention_forward

    from dpolab import packing

    layer = types.SimpleNamespace(training=True)
    packing.register_attention(packing.VARLEN_ATTENTION)

    def varlen(query, key, value, block_mask):  # FlashAttention's kernel on the row's sequences: no mask, no compile
        return packing.varlen_attention(layer, query, key, value, None, HEAD_DIM**-0.5, packed_varlen=sequences)[0]

    def as_transformers_calls(query, key, value, block_mask):  # K/V with 2 heads in: it repeats them to 14
        return flex_attention_forward(layer, query, key, value, block_mask, scaling=HEAD_DIM**-0.5)[0]

    def smaller_tiles(query, key, value, block_mask):  # twice the programs in the forward's grid
        return flex_attention_forward(layer, query, key, value, block_mask, scaling=HEAD_DIM**-0.5,
                                      kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})[0]  # fmt: skip

    def grouped(query, key, value, block_mask):  # laid out as transformers returns it: [1, T, heads, head dim]
        output = flex_attention(query, key, value, block_mask=block_mask, scale=HEAD_DIM**-0.5, enable_gqa=True)
        return output.transpose(1, 2)

    def compiled(function, dynamic):
        return torch.compile(function, backend=backend, dynamic=dynamic)

    # the most telling first: a row stopped at its time cap keeps the variants printed before it (log.txt)
    transformers_calls = compiled(as_transformers_calls, True)  # one compiled function: reset between variants
    return {
        "transformers, dpolab mask, dynamic (the compiled layer's)": (transformers_calls, "dpolab"),
        "varlen_attn (FlashAttention), the row as its sequences": (varlen, "dpolab"),
        "transformers, no mask, dynamic": (transformers_calls, "none"),
        "transformers, dpolab blocks, causal rule, dynamic": (transformers_calls, "dpolab blocks, causal rule"),
        "transformers, dpolab mask, one int32 code, dynamic": (transformers_calls, "dpolab code"),
        "grouped K/V (enable_gqa), dpolab mask, dynamic": (compiled(grouped, True), "dpolab"),
        "transformers, causal mask, dynamic": (transformers_calls, "causal"),
        "transformers, dpolab mask, static": (compiled(as_transformers_calls, False), "dpolab"),
        "transformers, dpolab mask, dynamic, forward tiles 64 x 64": (compiled(smaller_tiles, True), "dpolab"),
        "transformers, dpolab mask, int32 ids, dynamic": (transformers_calls, "dpolab int32"),
    }


def timed(function, inputs, block_mask, device: str, backward: bool):
    """Mean forward and backward microseconds over REPEATS calls, after 3 warm-up calls (compilation), and the
    last output."""
    import torch

    def call():
        return function(*inputs, block_mask)

    def clock():
        return torch.cuda.Event(enable_timing=True) if device == "cuda" else None

    for _ in range(3):
        output = call()
        if backward:
            output.backward(torch.ones_like(output))
    forward_us, backward_us = [], []
    for _ in range(REPEATS):
        marks = [clock() for _ in range(3)]
        started = time.perf_counter()
        if marks[0]:
            marks[0].record()
        output = call()
        if marks[1]:
            marks[1].record()
        middle = time.perf_counter()
        if backward:
            output.backward(torch.ones_like(output))
        if marks[2]:
            marks[2].record()
            torch.cuda.synchronize()
            forward_us.append(marks[0].elapsed_time(marks[1]) * 1e3)
            backward_us.append(marks[1].elapsed_time(marks[2]) * 1e3)
        else:
            forward_us.append((middle - started) * 1e6)
            backward_us.append((time.perf_counter() - middle) * 1e6)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return mean(forward_us), mean(backward_us) if backward else None, output.detach()


def measure(device: str, budget_s: float | None = None) -> dict:
    """Every variant's times, in order; past `budget_s` seconds the variants left are listed as not run (the
    device call's next rows need the time)."""
    import torch

    scale = 1 if device == "cuda" else 8
    backend = "inductor" if device == "cuda" else "aot_eager"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pair, segment, sequences = packed_row(device, scale)
    length = pair.numel()
    generator = torch.Generator(device).manual_seed(SEED)

    def tensor(heads):
        shape = (1, heads, length, HEAD_DIM)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_(device == "cuda")

    inputs = (tensor(HEADS), tensor(KV_HEADS), tensor(KV_HEADS))
    built = masks(pair, segment)
    results, first, started = [], None, time.perf_counter()
    for name, (function, mask_name) in variants(backend, sequences).items():
        torch._dynamo.reset()  # the variants share code objects: each compiles afresh, as named
        visited = visited_blocks(built[mask_name], length)
        result = {"variant": name, "visited_blocks": visited}
        if budget_s is not None and time.perf_counter() - started > budget_s:
            results.append(result | {"not_run": f"the row's {budget_s:.0f} s were spent"})
            continue
        try:  # FlexAttention has no backward on the CPU: forward only there
            result["forward_us"], result["backward_us"], output = timed(function, inputs, built[mask_name], device,
                                                                        backward=device == "cuda")  # fmt: skip
            if mask_name in SAME_ATTENTION:  # the same attention: the same output, whatever the kernel or ids
                first = output if first is None else first
                result["max_abs_diff"] = float((output.float() - first.float()).abs().max())
            flop = 4 * HEADS * HEAD_DIM * visited * 128 * 128
            result["forward_tflops_over_visited"] = flop / (result["forward_us"] * 1e-6) / 1e12
        except Exception as error:  # noqa: BLE001 (one variant failing must not lose the others)
            result["error"] = f"{type(error).__name__}: {error}"[:300]
        results.append(result)
        print(json.dumps(result), flush=True)
    blocks = -(-length // 128)
    return {"row_tokens": length, "query_blocks": blocks, "variants": results}


def text(measured: dict) -> str:
    lines = [f"FlexAttention alone, one layer, a packed row of {measured['row_tokens']:,} tokens "
             f"({measured['query_blocks']} query blocks of 128, {PAIRS} pairs), 14 query heads, head dim 64:", "",
             "| variant | key blocks visited | forward us | backward us | forward TFLOP/s over visited blocks | "
             "max abs diff from the first |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for one in measured["variants"]:
        if "not_run" in one:
            lines.append(f"| {one['variant']} | {one['visited_blocks']} | not run: {one['not_run']} | | | |")
            continue
        if "error" in one:
            lines.append(f"| {one['variant']} | {one['visited_blocks']} | failed: {one['error'][:120]} | | | |")
            continue
        backward = "-" if one["backward_us"] is None else f"{one['backward_us']:.0f}"
        diff = f"{one['max_abs_diff']:.1e}" if "max_abs_diff" in one else "-"  # other masks: other outputs
        lines.append(f"| {one['variant']} | {one['visited_blocks']} | {one['forward_us']:.0f} | {backward} | "
                     f"{one['forward_tflops_over_visited']:.1f} | {diff} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--budget_s", type=float, default=None, help="start no variant after this many seconds")
    args = parser.parse_args()
    print(text(measure(args.device, args.budget_s)))


if __name__ == "__main__":
    main()
