"""DPO training speed: plain TRL DPOTrainer (its defaults) against dpolab's fast settings, side by side, in one run.

    python bench/train_speed.py --device cpu            # 2-core variant (minutes)
    python bench/train_speed.py --device cuda           # Qwen2-0.5B architecture, random weights, bf16

Same random-init model, same synthetic pairs (realistic length spread), same number of optimizer steps for every
row. Each row prints pairs/s, tokens/s, peak memory (CPU: process RSS above the starting point; GPU:
torch.cuda.max_memory_allocated), and the final loss and reward accuracy; then the ratios against TRL's default.

Faster must not mean different: every lever here leaves the arithmetic of the loss unchanged, so the final
loss must match the default's to float noise (tolerance 1e-3 absolute on a loss near 0.69: the runs differ only
in summation order and, with checkpointing, in recomputation; larger gaps mean a lever changed the math).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

VOCAB = 151_936  # Qwen2's vocabulary: the LM head dominates small models
WORDS = [f"w{i}" for i in range(4000)]


def make_tokenizer(directory: Path):
    """A word-level tokenizer (one token per word), so synthetic lengths are token counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def make_pairs(count: int, max_length: int, seed: int = 0) -> list[dict]:
    """Prompts of 20-200 tokens, completions 20-400 (log-uniform): the spread of ultrafeedback, scaled down."""
    rng = random.Random(seed)

    def text(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(int(round(low * (high / low) ** rng.random()))))

    pairs = []
    for _ in range(count):
        prompt = text(20, min(200, max_length // 3))
        pairs.append({"prompt": prompt, "chosen": " " + text(20, 400), "rejected": " " + text(20, 400)})
    return pairs


def model_config(device: str):
    from transformers import Qwen2Config

    if device == "cuda":  # Qwen2-0.5B's architecture
        return Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip


class PeakMemory:
    """Peak process RSS above the level at start (CPU), or torch's peak allocation (GPU)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        process = psutil.Process()
        self.base = process.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss - self.base)
                time.sleep(0.01)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self.thread.join()


@contextlib.contextmanager
def completion_only_lm_head(enabled: bool):
    """dpolab's lever (see dpolab.train): score only completion positions through TRL's fused LM head."""
    if not enabled:
        yield
        return
    from dpolab.train import score_completion_tokens_only

    with score_completion_tokens_only():
        yield


def run_one(name, levers, args, model_dir, tokenizer, pairs, output_root) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cuda = args.device == "cuda"
    config = DPOConfig(
        output_dir=str(output_root / name), report_to=[], save_strategy="no", logging_steps=1, seed=0,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=1e-5, bf16=cuda, use_cpu=not cuda, dataloader_pin_memory=cuda, disable_tqdm=True,
        activation_checkpointing=levers.get("activation_checkpointing", True),  # TRL's default: on
        precompute_ref_log_probs=levers.get("precompute_ref_log_probs", False),
        use_liger_kernel=levers.get("use_liger_kernel", False),
        train_sampling_strategy="group_by_length" if levers.get("group_by_length") else "random",
        length_column_name="length",
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32},
    )  # fmt: skip
    dataset = Dataset.from_list(pairs)
    gc.collect()
    with PeakMemory(args.device) as memory, completion_only_lm_head(levers.get("completion_only", False)):
        started = time.perf_counter()
        trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=dataset, processing_class=tokenizer)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - started
    logs = [record for record in trainer.state.log_history if "loss" in record]
    tokens = trainer.state.log_history[-2].get("num_tokens") if len(trainer.state.log_history) > 1 else None
    result = {
        "name": name,
        "pairs_per_s": args.steps * args.batch_size / elapsed,
        "tokens_per_s": (tokens or 0) / elapsed,
        "peak_gib": memory.peak / 2**30,
        "final_loss": logs[-1]["loss"],
        "final_accuracy": logs[-1]["rewards/accuracies"],
        "setup_s": setup,
        "train_s": elapsed,
    }
    del trainer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="run only these rows")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from transformers import Qwen2ForCausalLM

    rows = {
        "TRL default": {},
        "no activation checkpointing": {"activation_checkpointing": False},
        "precompute_ref_log_probs": {"precompute_ref_log_probs": True},
        "completion-only LM head": {"completion_only": True},
        "dpolab fast (all three)": {
            "activation_checkpointing": False,
            "precompute_ref_log_probs": True,
            "completion_only": True,
        },  # fmt: skip
    }
    if args.only:
        rows = {name: levers for name, levers in rows.items() if name in args.only or name == "TRL default"}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        tokenizer = make_tokenizer(root / "model")
        torch.manual_seed(0)
        Qwen2ForCausalLM(model_config(args.device)).save_pretrained(root / "model")
        pairs = make_pairs(args.pairs, args.max_length)
        for pair in pairs:  # for group_by_length: a length proxy in tokens (one word = one token)
            pair["length"] = len(pair["prompt"].split()) + max(
                len(pair["chosen"].split()), len(pair["rejected"].split())
            )
        results = []
        for name, levers in rows.items():
            print(f"running: {name} ...", flush=True)
            results.append(run_one(name, levers, args, root / "model", tokenizer, pairs, root / "out"))
            print(format_row(results[-1]), flush=True)
    print_table(results, args)


def format_row(r: dict) -> str:
    return (f"  {r['name']:<30}{r['pairs_per_s']:>9.3f}{r['tokens_per_s']:>11.1f}{r['peak_gib']:>10.2f}"
            f"{r['final_loss']:>11.4f}{r['final_accuracy']:>10.3f}")  # fmt: skip


def print_table(results: list[dict], args) -> None:
    print(f"\ndevice {args.device}, {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
          f"vocab {VOCAB}, torch {torch.__version__}")  # fmt: skip
    print(f"  {'setting':<30}{'pairs/s':>9}{'tokens/s':>11}{'peak GiB':>10}{'final loss':>11}{'accuracy':>10}")
    for result in results:
        print(format_row(result))
    base = results[0]
    print("\nratios against TRL default (speed: higher is better; memory: lower is better):")
    for result in results[1:]:
        print(f"  {result['name']:<30} speed x{result['pairs_per_s'] / base['pairs_per_s']:.2f}   "
              f"peak memory x{result['peak_gib'] / max(base['peak_gib'], 1e-9):.2f}   "
              f"final loss diff {result['final_loss'] - base['final_loss']:+.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
