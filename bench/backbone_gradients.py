"""Are the CUDA-graph modes' gradients eager's on this machine? One check before any speed is read.

    python bench/backbone_gradients.py --device cuda     # bench/device.sh runs it first (~1 minute on a GPU)

Why: `packing.compile_backbone` runs every decoder layer through one nested compile region; on the CPU, with
inductor's buffer reuse on, the region's compiled backward gave wrong gradients (the tests' tiny model: 22 of 27
tensors, up to 1e4x off; this script's: 1.75x) while the forward stayed right (bench/RESULTS.md, fifteenth section).
dpolab turns that reuse off, and tests/test_packing.py compares every gradient with eager's under inductor's C++
kernels; a GPU compiles Triton kernels, with FlexAttention's own, which no CPU test reaches. In bf16 the bench's
loss curves would not show it (two correct runs differ by ~1e-2), so this compares in float32: a 4-layer Qwen2 (14
query heads, 2 key/value heads, head size 64, as Qwen2-0.5B's) on packed rows of two lengths, `compile_backbone`
with inductor against the same model eager, every parameter's gradient, with the attention the fast path takes on
this device (FlexAttention on a GPU); `--layer_by_layer` is the control without the region. First the same with
FlashAttention's varlen kernel (`varlen_attn`) on rows of the fixed shapes the CUDA-graph modes give it, whose unread
keys' gradient rows the kernel need not write (`packing.varlen_attention` drops them): under bf16 autocast on a GPU,
the kernel computing in bf16 only. Prints one line per row length and attention, and the verdicts; writes them to
--out as JSON as each is known.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from dpolab import packing  # noqa: E402

# compiled against eager in float32: 7.4e-3 of a tensor's largest entry on the CPU, the same with the region and
# without it (--layer_by_layer); the wrong gradients were off by 1e0 to 1e4 of it
TOLERANCE = 5e-2
# under bf16 autocast (varlen_attn on a GPU) compiled and eager round differently (inductor keeps fused intermediates
# in float32): a looser bound, still an order of magnitude under the errors it is there to catch (and NaN)
TOLERANCE_BF16 = 2e-1


def packed_row(seed: int, pairs: int, device: str, varlen: bool, fixed_shapes: bool) -> dict:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(3, 1000) for _ in range(rng.randint(low, high))]

    examples = [{"prompt_ids": ids(20, 200), "chosen_ids": ids(20, 300), "rejected_ids": ids(20, 300)}
                for _ in range(pairs)]  # fmt: skip
    # rows rounded as under CUDA graphs, both models' (the loss reads the padding's hidden states too)
    batch = packing.pack_batch(examples, 1024, 0, packing.CUDA_GRAPH_ROW_MULTIPLE, varlen, fixed_shapes)
    keys = packing.PACKED_KEYS[:4] + (packing.VARLEN_KEYS if varlen else ())  # the packed row, as dpolab's head asks
    return {key: batch[key].to(device) for key in keys if key in batch}


def check(attention: str, device: str) -> list[dict]:
    """`compile_backbone` (inductor) against the same model eager, on two packed rows: per row, the worst gradient's
    largest difference relative to its largest entry. varlen_attn: the compiled model on rows of fixed shapes, as
    under CUDA graphs (keys no sequence reads, whose gradient rows FlashAttention need not write), eager on the plain
    layout; on a GPU both under bf16 autocast (FlashAttention computes in bf16 only)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    packing.register_attention(attention)
    config = Qwen2Config(vocab_size=1024, hidden_size=896, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=8192)  # fmt: skip
    eager, compiled = (AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(device)
                       for _ in "ab")  # fmt: skip
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        packing.install(model)
    packing.compile_backbone(compiled, "inductor", None)
    varlen = attention == packing.VARLEN_ATTENTION
    autocast = varlen and device == "cuda"
    results = []
    for seed, pairs in ((0, 4), (1, 6)):  # two row lengths: the second runs the graph compiled for the first
        started = time.perf_counter()
        for model in (compiled, eager):
            inputs = packed_row(seed, pairs, device, varlen, fixed_shapes=varlen and model is compiled)
            model.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                hidden = model.model(**inputs, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()
        seconds = time.perf_counter() - started
        eager_gradients = dict(eager.named_parameters())
        worst, worst_name = 0.0, None
        for name, parameter in compiled.named_parameters():
            expected = eager_gradients[name].grad
            if expected is None:
                continue
            off = ((parameter.grad - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).nan_to_num(
                float("inf")).item()  # fmt: skip
            if off >= worst:
                worst, worst_name = off, name
        results.append({"tokens": hidden.shape[1], "attention": attention, "bf16_autocast": autocast,
                        "seconds": seconds, "worst_relative_difference": worst, "worst_tensor": worst_name,
                        "tolerance": TOLERANCE_BF16 if autocast else TOLERANCE})  # fmt: skip
        print(f"{results[-1]['tokens']} tokens ({attention}{', bf16 autocast' if autocast else ''}): worst gradient "
              f"off by {worst:.2e} of its largest entry ({worst_name}); compiled + eager step {seconds:.1f} s",
              flush=True)  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="a directory for gradients.json")
    parser.add_argument("--layer_by_layer", action="store_true",
                        help="the control: the backbone traced layer by layer, without the region")  # fmt: skip
    args = parser.parse_args()
    if args.layer_by_layer:
        torch.compiler.nested_compile_region = lambda function: function
    # FlashAttention's varlen kernel first (on the CPU its reference), as bench/device.sh runs its CUDA-graph row
    # first; then FlexAttention, which has no CPU backward (SDPA there)
    attentions = [packing.VARLEN_ATTENTION] if packing.varlen_attn is not None else []
    attentions += ["flex_attention" if args.device == "cuda" else "sdpa"]
    verdicts, rows = {}, []
    for attention in attentions:  # each verdict printed and written as soon as it is known
        results = check(attention, args.device)
        rows += results
        verdicts[attention] = ("eager's" if all(r["worst_relative_difference"] < r["tolerance"] for r in results)
                               else "WRONG")  # fmt: skip
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gradients.json").write_text(json.dumps({"verdicts": verdicts, "rows": rows}, indent=1))
    summary = ", ".join(f"{attention} {verdict}" for attention, verdict in verdicts.items())
    print(f"compile_backbone's gradients on {args.device}: {summary} (tolerance {TOLERANCE:g}; under bf16 autocast "
          f"{TOLERANCE_BF16:g})", flush=True)  # fmt: skip
    return 0 if set(verdicts.values()) == {"eager's"} else 1


if __name__ == "__main__":
    sys.exit(main())
