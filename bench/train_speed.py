"""DPO training speed and memory: plain TRL DPOTrainer (its defaults) against dpolab's fast path, side by side.

    python bench/train_speed.py --device cuda --out DIR     # Qwen2-0.5B architecture, random weights (minutes)
    python bench/train_speed.py --device cpu --out DIR      # a small Qwen2 with the real vocabulary (smoke check)

The workload is the reference job's shape: the Qwen2-0.5B architecture with random weights and the real
151,936-token vocabulary, ultrafeedback-shaped message-list pairs (prompts 35-370 tokens, answers 35-740,
log-uniform: about 780 real tokens per pair as TRL counts them), max_length 1024, batch 8, lr 5e-7, the same
pairs in the same order for every row (sequential sampler). Each row runs in its own process (a fresh GPU);
pairs/s is measured over steps 9..N (after warm-up and compilation); MFU = 8N FLOP per real token (6N for the
policy's forward and backward, 2N for the reference), N = all parameters, over the card's dense bf16 peak.

Rows: TRL's default (float32 weights + bf16 autocast, activation checkpointing, reference forward every step,
padded batches); dpolab's fast path (the same float32 master weights, pairs packed with each prompt computed
once, FlexAttention, reference log-probs in a cached pre-pass, no checkpointing, decoder layers compiled as
`dpolab train` compiles them on CUDA: `dpolab-fast-compile`) and variants (`dpolab-fast`: eager layers;
`dpolab-fast-compile-varlen`: FlashAttention's varlen kernel instead of FlexAttention, `packing.varlen_attention`;
the `-cudagraphs` rows: the whole backbone replayed as CUDA graphs, `torch_compile_mode reduce-overhead`);
`dpolab train --preset smoke` and `--preset full --gpu_memory_gib 24` through the real CLI code;
`trl-default-eager-attention`: TRL's default with another attention kernel, how far two correct bf16 computations of
the same steps drift apart (the floor for the loss diffs); `flex-attention`: one
layer's attention alone (bench/flex_attention.py). Every training row records the share of weights its updates
changed, its peak memory, and its per-step losses (compared with TRL's default).

Faster must not mean different: the fast path's per-step loss must match TRL's default on the same data.
Tolerance 1e-2 absolute per step: under bf16 autocast each per-token log-prob carries ~1e-2 of rounding
noise that the two computations (different attention kernels and layouts) round differently; over ~350 answer
tokens that is ~0.2 nats in a sequence sum, times beta 0.1 ~0.02 in the margin and, at the sigmoid's slope
of 1/2 near ln 2, ~0.01 in the loss. On the CPU in float32 the two agree to 1e-4 (tests/test_packing.py).
That is the typical size, not a bound on the largest of 40 steps: on an H200 (bench/RESULTS.md, 2026-11-27) the
compiled fast path's diffs had sd 3.5e-3 and max 9.6e-3, the varlen row's sd 4.6e-3 and max 1.37e-2, at the same
step. `trl-default-eager-attention` measures how far TRL's own run moves with another attention kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VOCAB = 151_936
PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}  # H100/H200 SXM dense bf16
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Letters only: Qwen2's tokenizer splits digits one by one, whatever tokenizer.json says.
WORDS = ["q" + "".join(chr(97 + (i // 26**k) % 26) for k in range(3)) for i in range(3000)]
# The side by side (TRL's default, the fast path as `dpolab train` runs it on CUDA: compiled layers) and the
# full preset's memory; then the rest, each started only before --budget_s
REQUIRED_ROWS = ("trl-default", "dpolab-fast-compile", "cli-full")
OPTIONAL_ROWS = ("trl-default-eager-attention", "dpolab-fast", "cli-smoke", "dpolab-fast-compile-512",
                 "dpolab-fast-compile-host-waits", "dpolab-fast-compile-trl-head", "dpolab-fast-compile-log10",
                 "dpolab-fast-compile-cpp-wrapper", "dpolab-fast-compile-backbone",
                 "dpolab-fast-compile-backbone-cudagraphs", "dpolab-fast-compile-backbone-cudagraphs-gqa",
                 "dpolab-fast-compile-gqa", "dpolab-fast-compile-b16", "cli-smoke-eager", "reference-prepass",
                 "flex-attention", "trl-bf16-precompute", "dpolab-fast-liger",
                 "dpolab-fast-sdpa", "dpolab-fast-bf16-kahan", "dpolab-fast-compile-varlen",
                 "dpolab-fast-compile-varlen-cudagraphs")  # fmt: skip
MIN_ROW_S = 45  # with --deadline_s, a row is not started with less time than this left
# the flex-attention row starts no variant after this many seconds (each compiles its kernels): it runs before the
# CUDA-graph row in bench/device.sh, whose whole-backbone compile needs the call's time after it
FLEX_ATTENTION_BUDGET_S = 120
CUDA_GRAPHS = {"torch_compile": True, "torch_compile_mode": "reduce-overhead"}
ROW_FIELDS = {  # dpolab's fast path, and what each variant row changes
    "dpolab-fast": {},
    "dpolab-fast-compile": {"torch_compile": True},  # decoder layers compiled in place (packing.compile_layers)
    "dpolab-fast-compile-512": {"torch_compile": True, "pad_to_multiple_of": 512},  # fewer row lengths, no graphs
    "dpolab-fast-compile-cpp-wrapper": {"torch_compile": True},  # + INDUCTOR_CONFIG below
    # logging every 10 steps, as the full preset does: the loss and grad norm read on the host one step in 10
    "dpolab-fast-compile-log10": {"torch_compile": True, "logging_steps": 10},
    # the step as it was before it stopped waiting for the GPU: TRL's own loss and metrics (17 reads of device values
    # per step), its LM head (2, TRL_HEAD_ROWS), transformers' NaN filter (2) and blocking copies of each batch
    "dpolab-fast-compile-host-waits": {
        "torch_compile": True,
        "logging_nan_inf_filter": True,
        "accelerator_config": {"non_blocking": False},
    },
    "dpolab-fast-compile-trl-head": {"torch_compile": True},  # today's step but TRL's LM head (TRL_HEAD_ROWS)
    # the whole backbone compiled as one graph after the pre-pass (packing.compile_backbone, here in the default
    # mode: WHOLE_BACKBONE_ROW), not each layer: one guard check and two graph calls per step instead of 24 and 48
    # (the H100 profile: ~32 ms of the graphs' Python wrappers and 5 ms of guards per step)
    "dpolab-fast-compile-backbone": {},
    # `dpolab train --torch_compile_mode reduce-overhead`: that graph replayed as a CUDA graph, one recording per row
    # length (rows rounded to 512 tokens): no kernel launched from Python in the backbone (per layer, CUDA graphs
    # were a dead end: 24 backwards left pending)
    "dpolab-fast-compile-backbone-cudagraphs": CUDA_GRAPHS,
    "dpolab-fast-compile-backbone-cudagraphs-gqa": CUDA_GRAPHS,  # + GQA_ROWS: both levers at once
    "dpolab-fast-compile-gqa": {"torch_compile": True},  # + FlexAttention with grouped K/V (gqa_flex_attention)
    # no FlexAttention: FlashAttention's varlen kernel, each pair as two sequences (packing.varlen_attention)
    "dpolab-fast-compile-varlen": {"torch_compile": True, "attn_implementation": "varlen_attn"},
    # both: the whole backbone replayed as CUDA graphs around FlashAttention's varlen kernel, its sequences' tensors
    # in shapes set by the row length (packing.varlen_layout's fixed shapes)
    "dpolab-fast-compile-varlen-cudagraphs": {**CUDA_GRAPHS, "attn_implementation": "varlen_attn"},
    # 16 pairs per step in one micro-batch, the full preset's on an 80 GB card: another workload (no loss diff)
    "dpolab-fast-compile-b16": {"torch_compile": True, "per_device_train_batch_size": 16},
    "dpolab-fast-liger": {"use_liger_kernel": True},
    "dpolab-fast-sdpa": {"attn_implementation": "sdpa"},
    "dpolab-fast-bf16-kahan": {"dtype": "bfloat16"},
    "reference-prepass": {},  # the fast path's trainer, whose pre-pass alone is timed (reference_passes)
}
# inductor settings of a row: cpp_wrapper launches a compiled graph's kernels from C++ rather than Python (the
# graphs' Python wrappers took ~32 ms of host time per step in the H100 profile of 2026-11-26)
INDUCTOR_CONFIG = {"dpolab-fast-compile-cpp-wrapper": {"cpp_wrapper": True}}
# the row whose whole backbone the bench compiles in the default mode (dpolab train does it for the CUDA-graph modes)
WHOLE_BACKBONE_ROW = "dpolab-fast-compile-backbone"
# rows whose backbone is compiled as one graph after their reference pre-pass, which ran eager
WHOLE_BACKBONE_ROWS = (WHOLE_BACKBONE_ROW, "dpolab-fast-compile-backbone-cudagraphs",
                       "dpolab-fast-compile-backbone-cudagraphs-gqa",
                       "dpolab-fast-compile-varlen-cudagraphs")  # fmt: skip
# their first step compiles the backbone, one decoder layer traced for all (190 s on an H200 machine when the 24 layers
# were traced one by one; 5x less with inductor on this project's CPU): their cap is this much longer than --row_cap_s
WHOLE_BACKBONE_CAP = 1.5
# rows whose FlexAttention reads K/V grouped (gqa_flex_attention)
GQA_ROWS = ("dpolab-fast-compile-gqa", "dpolab-fast-compile-backbone-cudagraphs-gqa")
# rows whose batches leave out the answer positions, so TRL's fused LM head scores them (packing.answer_head_forward)
TRL_HEAD_ROWS = ("dpolab-fast-compile-host-waits", "dpolab-fast-compile-trl-head")


# --- the world: tokenizer, model, data ----------------------------------------------------------------------------


def build_world(work: Path, device: str, pairs: int, seed: int = 0) -> dict:
    """A byte-level BPE tokenizer with one token per word (AutoTokenizer reloads it correctly next to a qwen2
    config, unlike a word-level one), a random-init model, and ultrafeedback-shaped data."""
    model_dir = work / "model"
    tokenizer = build_tokenizer(model_dir)
    build_model(model_dir, tokenizer, device, seed)
    data = build_data(work / "data", pairs, scale=1 if device == "cuda" else 8, seed=seed)
    return {"model": str(model_dir), "data": str(data)}


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=12000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([" ".join(WORDS)] * 4 + ["user\nassistant\n"] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML)  # fmt: skip
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_model(directory: Path, tokenizer, device: str, seed: int) -> None:
    """The Qwen2-0.5B architecture (a 2-layer one on the CPU) with random weights and the real vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2) if device == "cuda" else dict(hidden_size=128, intermediate_size=384,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)


def build_data(directory: Path, pairs: int, scale: int, seed: int) -> Path:
    """Message-list pairs, implicit prompt: prompts 35-370 words, answers 35-740 (log-uniform), / scale."""
    rng = random.Random(seed)

    def text(low, high):
        low, high = low // scale, high // scale
        return " ".join(rng.choice(WORDS) for _ in range(int(round(low * (high / low) ** rng.random()))))

    def pair():
        user = {"role": "user", "content": text(35, 370)}
        return {"chosen": [user, {"role": "assistant", "content": text(35, 740)}],
                "rejected": [user, {"role": "assistant", "content": text(35, 740)}]}  # fmt: skip

    directory.mkdir(parents=True, exist_ok=True)
    train = [pair() for _ in range(pairs)]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    (directory / "test.jsonl").write_text("".join(json.dumps(pair()) + "\n" for _ in range(32)))
    return directory


def token_layout(world: dict, max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) scored tokens per training pair, in data order, as TRL tokenizes them."""
    from dpolab.data import load_pairs, pair_token_ids
    from dpolab.models import load_tokenizer

    tokenizer = load_tokenizer(world["model"])
    sample = " ".join(WORDS[:50])
    assert len(tokenizer(sample)["input_ids"]) == 50, "the bench tokenizer must give one token per word"
    layout = []
    for pair in load_pairs(world["data"], "train").dataset:
        ids = pair_token_ids(pair, tokenizer)
        room = max_length - len(ids["prompt_ids"])
        layout.append((len(ids["prompt_ids"]), len(ids["chosen_ids"][:room]), len(ids["rejected_ids"][:room])))
    return layout


# --- one row, in its own process ----------------------------------------------------------------------------------


class StepClock:
    """When every optimizer step ended: on the host (`times`: times[i] ends step i+1) and, on CUDA, on the GPU's own
    timeline (an event recorded after each step's work). The speed is read from the events, so the clock adds no
    wait for the GPU: a `torch.cuda.synchronize()` per step, as before, kept the host from queueing the next step
    while the GPU finished this one."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if device == "cuda":
                    import torch

                    clock.events.append(torch.cuda.Event(enable_timing=True))
                    clock.events[-1].record()
                clock.times.append(time.perf_counter())

        self.times, self.events, self.callback = [], [], Callback()

    def seconds(self, step: int) -> float:
        """How long step+1 took: from the end of the step before it to its own end."""
        if self.events:
            return self.events[step - 1].elapsed_time(self.events[step]) / 1e3
        return self.times[step] - self.times[step - 1]

    def pairs_per_s(self, batch: int, first: int = 8, left_out: range = range(0)) -> float:
        """Pairs per second over steps first+1..N, leaving out the steps in `left_out` (profiled ones)."""
        first = min(first, len(self.times) - 2)
        steps = [step for step in range(first + 1, len(self.times)) if step + 1 not in left_out]  # times[i]: step i+1
        return self.rate(batch, steps)

    def rate(self, batch: int, steps: list[int]) -> float:
        """Pairs per second over the given steps (indices into `times`: i is step i+1)."""
        if self.events:
            import torch

            torch.cuda.synchronize()  # every event has happened
        return len(steps) * batch / sum(self.seconds(step) for step in steps)


def replayed_steps(row_lengths: list[int], first: int = 8) -> list[int]:
    """The steps after `first` (indices as StepClock's) whose packed row length two earlier steps had: CUDA-graph
    trees run a graph's first call for a new length as a warm-up and record it at the second, so only from the
    third on does a step replay. A long run meets every length (rows rounded to 512 tokens: ~8 on this workload)
    within its first dozens of steps; a 40-step row meets 3 or 4 of them for the first time inside its window."""
    return [step for step in range(max(first, 1), len(row_lengths))
            if row_lengths[:step].count(row_lengths[step]) >= 2]  # fmt: skip


class StepProfiler:
    """torch.profiler over optimizer steps 13-16 (compiled and warm by then): where a step's time goes, host
    (Python, kernel launches) against device, written as three tables (by device time, host time, calls).

    Not on CUDA-graph rows: CUPTI's view of graph replays is known to be wrong (pytorch/kineto#1165) and profiling
    them has crashed processes in past CUDA releases (pytorch/pytorch#75504, #112507), which would lose the row's
    speed; each replayed graph is one launch, so its profile would say little."""

    FIRST, STEPS = 13, 4

    @classmethod
    def steps(cls) -> range:
        return range(cls.FIRST, cls.FIRST + cls.STEPS)

    @classmethod
    def clock_left_out(cls) -> range:
        """The steps a speed must leave out: the profiled ones and the next, whose time holds writing the tables
        (seconds: the H100 run of 2026-11-26 evening counted them, which cut the rows' pairs/s by up to 3x)."""
        return range(cls.FIRST, cls.FIRST + cls.STEPS + 1)

    def __init__(self, path: Path, row: str, device: str):
        import torch
        from transformers import TrainerCallback

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.path, self.row, self.device, self.started = path, row, device, None
        self.profiler = torch.profiler.profile(activities=activities)
        self.syncs = SyncCounter()
        profiler = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == profiler.FIRST:
                    profiler.profiler.start()
                    if device == "cuda":
                        profiler.syncs.start()
                    profiler.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == profiler.steps()[-1] and profiler.started is not None:
                    profiler.write()

        self.callback = Callback()

    def write(self) -> None:
        import torch

        syncs = self.syncs.stop()  # before the synchronize below, which would count
        if self.device == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.started) / self.STEPS * 1e3
        self.profiler.stop()
        averages = self.profiler.key_averages()
        # kernels only, as the table's "Self CUDA time total": an operator and a compiled graph's launch record
        # carry their kernels' device time too (counting those doubled the figure in the H100 run of 2026-11-26)
        kernels = [event for event in averages if event.device_type == torch.autograd.DeviceType.CUDA
                   and not event.is_user_annotation]  # fmt: skip
        device_us = sum(event.self_device_time_total for event in kernels) / self.STEPS
        operations = sum(event.count for event in kernels)
        aten_calls = sum(event.count for event in averages if event.key.startswith("aten::"))  # nested ones too
        by_device = averages.table(
            sort_by="self_device_time_total" if self.device == "cuda" else "self_cpu_time_total", row_limit=30
        )
        by_host = averages.table(sort_by="self_cpu_time_total", row_limit=30)
        by_calls = averages.table(sort_by="count", row_limit=25)  # a launch-bound step: what is issued most
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as profiles:  # one file for every row: a lent GPU returns only a few files
            profiles.write(
                f"## {self.row}\n\nsteps {self.FIRST}-{self.steps()[-1]}: {wall_ms:.1f} ms wall per step, "
                f"{device_us / 1e3:.1f} ms of device time per step, ~{operations // self.STEPS} device operations "
                f"and ~{aten_calls // self.STEPS} aten operator calls per step\n\n"
                f"By device time:\n{by_device}\n\nBy host time:\n{by_host}\n\nBy calls:\n{by_calls}\n\n"
                f"Host waits for the device (synchronizing calls per step, by Python caller):\n{syncs}\n\n"
            )


class SyncCounter:
    """Where the host waits for the GPU: `torch.cuda.set_sync_debug_mode("warn")` warns at every synchronizing
    call (`.item()`, a copy to the host, ...), from the Python line that made it; counted by that line. Each such
    wait drains the queue, so the GPU idles while the host prepares what follows: the step stops overlapping."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        import collections

        self.counts, self.previous = collections.Counter(), None

    def start(self) -> None:
        import warnings

        import torch

        warnings.filterwarnings("always", message=self.MESSAGE)
        self.previous = warnings.showwarning
        warnings.showwarning = self.record
        torch.cuda.set_sync_debug_mode("warn")

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.MESSAGE in str(message):
            self.counts[f"{'/'.join(Path(filename).parts[-3:])}:{lineno}"] += 1
        else:
            self.previous(message, category, filename, lineno, file, line)

    def stop(self, steps: int = StepProfiler.STEPS) -> str:
        """The counts per step, most first ("not counted" where it never started: the CPU)."""
        import warnings

        if self.previous is None:
            return "not counted"
        import torch

        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self.previous
        return "\n".join(f"{count / steps:6.1f}  {caller}" for caller, count in self.counts.most_common(25)) or "none"


def compiled_graphs() -> dict:
    """What torch.compile did in this process: frames compiled (recompilations count again) and graphs. A row
    whose layers recompile for every new row length shows a count that grows with the steps; the log says why
    (TORCH_LOGS=recompiles, set by bench/device.sh)."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}  # fmt: skip


def record_cudagraph_skips() -> list[str]:
    """Inductor's reasons for running a graph without CUDA graphs under `reduce-overhead`, as it words them (it warns
    once, somewhere in log.txt; a row that lost its graphs only looks slow in the table). Kept in the returned list,
    which goes into the row's JSON and the table, from the three modules that import the logging function by name."""
    import torch._inductor.cudagraph_trees as trees
    import torch._inductor.cudagraph_utils as utils
    import torch._inductor.output_code as output_code

    reasons, log = [], utils.log_cudagraph_skip_and_bump_counter

    def recorded(message: str) -> None:
        reasons.append(message[:800])
        log(message)

    for module in (utils, output_code, trees):
        module.log_cudagraph_skip_and_bump_counter = recorded
    return reasons


def snapshot(model):
    """The initial weights, in host memory (a copy on the GPU would add to the peak being measured)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def changed_share(model, initial) -> float:
    params = dict(model.named_parameters())
    changed = sum(int((params[name].detach().cpu() != value).sum()) for name, value in initial.items())
    return changed / sum(value.numel() for value in initial.values())


def trl_trainer(world, args, tokenizer):
    """TRL's DPOTrainer with TRL's defaults: float32 weights under bf16 autocast, activation checkpointing, the
    reference model's forward in every step ("trl-default"); the same with transformers' eager attention
    ("trl-default-eager-attention": another correct bf16 computation of the same steps, whose loss diff from
    TRL's default is the floor the fast path's rows are read against); or bf16 weights, no checkpointing and a
    reference pre-pass, TRL's fastest setting measured before ("trl-bf16-precompute")."""
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs

    fastest = args.row == "trl-bf16-precompute"
    attention = {"attn_implementation": "eager"} if args.row == "trl-default-eager-attention" else {}
    config = DPOConfig(
        output_dir=str(Path(args.work) / "runs" / args.row), max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=5e-7, beta=0.1, max_length=1024, logging_steps=1, save_strategy="no", seed=0,
        train_sampling_strategy="sequential", report_to=[], bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        activation_checkpointing=not fastest, precompute_ref_log_probs=fastest,
        model_init_kwargs={"dtype": "bfloat16" if fastest else "float32", **attention},
    )  # fmt: skip
    pairs = load_pairs(world["data"], "train")
    return DPOTrainer(model=world["model"], args=config, train_dataset=pairs.dataset, processing_class=tokenizer)


def train_config(world, args, **fields):
    """A dpolab TrainConfig for the bench workload, with `fields` overriding."""
    import yaml

    from dpolab.config import parse_train_args

    values = dict(model_name_or_path=world["model"], dataset_name=world["data"], runs_dir=str(Path(args.work) / "runs"),
                  run_name=args.row, max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                  learning_rate=5e-7, beta=0.1, max_length=1024, logging_steps=1, save_strategy="no", seed=0,
                  train_sampling_strategy="sequential", report_to=[], dtype="float32", bf16=args.device == "cuda",
                  use_cpu=args.device == "cpu", fit_to_memory=False, activation_checkpointing=False,
                  dataloader_pin_memory=args.device == "cuda")  # fmt: skip
    values.update(fields)
    path = Path(args.work) / f"{args.row}.yaml"
    path.write_text(yaml.safe_dump(values))
    return parse_train_args(["--config", str(path)])


def run_row(args) -> dict:
    import torch

    world = json.loads((Path(args.work) / "world.json").read_text())
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = {"row": args.row}
    # each row's own cache: its set-up runs (and compiles) its own reference pre-pass, as a first run does, never
    # reads another row's (set-up times stay comparable, and the warm pass timed after training stays warm)
    os.environ["DPOLAB_CACHE"] = str(Path(args.work) / "cache" / args.row)
    shutil.rmtree(os.environ["DPOLAB_CACHE"], ignore_errors=True)
    if args.row.startswith("cli-"):
        return run_cli_row(args, world, result)
    if args.row == "flex-attention":  # one layer's attention alone, on a packed row of this workload's shape
        import flex_attention

        return result | flex_attention.measure(args.device, FLEX_ATTENTION_BUDGET_S)
    from dpolab.models import load_tokenizer

    for name, value in INDUCTOR_CONFIG.get(args.row, {}).items():
        setattr(torch._inductor.config, name, value)
    tokenizer = load_tokenizer(world["model"])
    if args.row in GQA_ROWS:
        from transformers import AttentionInterface

        AttentionInterface.register("flex_attention", gqa_flex_attention)  # in this row's process only
    started = time.perf_counter()
    trainer = row_trainer(world, args, tokenizer)
    result["setup_s"] = time.perf_counter() - started
    if args.row == "reference-prepass":
        return result | {"passes": reference_passes(trainer, args.device)}
    if args.row == "dpolab-fast-compile-host-waits":  # TRL's compute_loss, as before the metrics stayed on the GPU
        from trl import DPOTrainer

        trainer.compute_loss = types.MethodType(DPOTrainer.compute_loss, trainer)
    if args.row == WHOLE_BACKBONE_ROW:
        from dpolab import packing

        packing.compile_backbone(trainer.model, "inductor", None)
    if args.row in TRL_HEAD_ROWS:
        from dpolab.packing import ANSWER_KEYS

        collate = trainer.data_collator
        trainer.data_collator = lambda examples: {
            key: value for key, value in collate(examples).items() if key not in ANSWER_KEYS
        }
    if args.row == "dpolab-fast-bf16-kahan":  # bf16 weights with Kahan-compensated AdamW (torch-optimi)
        import optimi

        trainer.optimizer_cls_and_kwargs = (optimi.AdamW, dict(lr=5e-7, betas=(0.9, 0.999), eps=1e-8,
                                                                weight_decay=0.0, kahan_sum=True))  # fmt: skip
    clock = StepClock(args.device)
    trainer.add_callback(clock.callback)
    from dpolab.packing import records_cuda_graphs

    fields = ROW_FIELDS.get(args.row, {})  # `dpolab train --torch_compile_mode reduce-overhead`
    graphs = records_cuda_graphs(fields.get("torch_compile", False), fields.get("torch_compile_mode"))
    profiled = args.profile and not (cuda and graphs)  # CUPTI with CUDA graphs: see StepProfiler
    cudagraph_skips = record_cudagraph_skips() if graphs else []
    row_lengths = []  # per training step, in order (the pre-pass is done; the collator runs once per step)
    if graphs:
        collate = trainer.data_collator

        def collate_and_note(examples):
            batch = collate(examples)
            row_lengths.append(batch["packed_input_ids"].shape[1])
            return batch

        trainer.data_collator = collate_and_note
    if profiled:
        trainer.add_callback(StepProfiler(Path(args.out) / "profiles.txt", args.row, args.device).callback)
    initial = snapshot(trainer.model)
    training_started = time.perf_counter()
    trainer.train()
    result.update(
        first_step_s=clock.times[0] - training_started,  # includes compiling the training graph, where compiled
        pairs_per_s=clock.pairs_per_s(
            row_batch(args.row), left_out=StepProfiler.clock_left_out() if profiled else range(0)
        ),
        weights_changed=changed_share(trainer.model, initial),
        losses=[r["loss"] for r in trainer.state.log_history if "loss" in r],
        loss_steps=[r["step"] for r in trainer.state.log_history if "loss" in r],
        num_tokens=[r.get("num_tokens") for r in trainer.state.log_history if "loss" in r][-1],
        attention=trainer.model.config._attn_implementation,
        checkpointing=bool(trainer.args.activation_checkpointing),
        compiled_graphs=compiled_graphs(),
        cudagraph_skip_reasons=cudagraph_skips[:3],
    )
    replayed = replayed_steps(row_lengths[: len(clock.times)])
    if replayed and not profiled:
        result.update(replayed_steps=len(replayed), row_lengths=sorted(set(row_lengths)),
                      pairs_per_s_replayed=clock.rate(row_batch(args.row), replayed))  # fmt: skip
    if cuda:
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)  # fmt: skip
    # dpolab's pre-pass timed again, warm: in eval mode as at set-up, where the compiled layers' inference graph
    # was compiled (in training mode they would compile again); eager for the whole-backbone rows, as their set-up
    # pass ran before the backbone was compiled (compiled, it would compile once more, inside the timing)
    if hasattr(trainer, "reference_pass"):
        trainer.model.eval()
        stance = "force_eager" if args.row in WHOLE_BACKBONE_ROWS else "default"
        try:  # an extra: its failure must not lose the row's training figures
            torch.compiler.set_stance(stance)
            if args.row == "dpolab-fast-compile":  # also at larger batches: what `precompute_ref_batch_size` could be
                result["passes"] = reference_passes(trainer, args.device)
                result["reference_pairs_per_s"] = result["passes"][0]["pairs_per_s"]  # batch 8, the row's
            else:
                result["reference_pairs_per_s"] = timed_reference_pass(trainer, args.device, row_batch(args.row))[0]
        except Exception as error:  # noqa: BLE001
            result["reference_pass_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def gqa_flex_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The GQA_ROWS' attention: FlexAttention with grouped-query attention on. transformers
    5.24 repeats K and V to every query head when the number of query heads is not a power of two (Qwen2-0.5B: 14
    query heads, 2 K/V heads), so the kernels read 7x the K/V and the backward sums 14 heads' dK/dV back to 2;
    `enable_gqa` reads them grouped (the same values: bit-identical forward on this project's CPU). Packed rows
    only (a BlockMask); anything else is transformers' own."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.flex_attention import compile_friendly_flex_attention, flex_attention_forward

    if not isinstance(attention_mask, BlockMask) or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    output = compile_friendly_flex_attention(query, key, value, block_mask=attention_mask, scale=scaling,
                                             enable_gqa=True, training=module.training)  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def row_trainer(world, args, tokenizer):
    """A `trl-` row's trainer (plain TRL: its DPOTrainer, its collator, its defaults), or a dpolab row's, built as
    `dpolab train` builds it (the reference pre-pass included)."""
    if args.row.startswith("trl-"):
        return trl_trainer(world, args, tokenizer)
    from dpolab import train

    config = train_config(world, args, fast_path=True, precompute_ref_log_probs=True, **ROW_FIELDS[args.row])
    train_pairs, _ = train.load_train_eval(config)
    return train.build_trainer(config, world["model"], tokenizer, train_pairs, None)


def run_cli_row(args, world, result) -> dict:
    """`dpolab train --preset smoke|full` through train.run, as a user runs it: on a GPU with its layers compiled
    (train.choose_torch_compile); `cli-smoke-eager`: the smoke preset with `--torch_compile false`."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab import train
    from dpolab.config import parse_train_args

    preset, _, variant = args.row.removeprefix("cli-").partition("-")
    argv = ["--preset", preset, "--model_name_or_path", world["model"], "--dataset_name", world["data"], "--runs_dir",
            str(Path(args.work) / "runs"), "--run_name", args.row, "--train_sampling_strategy", "sequential",
            "--report_to", "none", "--save_strategy", "no"]  # fmt: skip
    # full: 12 steps of it with the settings a user's whole epoch gets on a 24 GiB card: the reference pre-pass
    # (12 steps alone would compute the reference in each step, train.choose_reference_pass) and what fit_to_memory
    # chooses for an epoch of 62,135 pairs of this data, 8 x 2 without activation checkpointing (planned 20.36 GiB
    # for its largest micro-batch, 8,640 tokens: bench/plan_vs_measured.py; for 12 steps alone it would choose
    # 16 x 1). With fit_to_memory off, checkpointing must be given: TRL's default is on.
    argv += (["--max_steps", str(args.steps)] if preset == "smoke"
             else ["--max_steps", "12", "--gpu_memory_gib", "24", "--precompute_ref_log_probs", "true",
                   "--fit_to_memory", "false", "--per_device_train_batch_size", "8",
                   "--gradient_accumulation_steps", "2", "--activation_checkpointing", "false"])  # fmt: skip
    argv += ["--torch_compile", "false"] if variant == "eager" else []
    started = time.perf_counter()
    summary = train.run(parse_train_args(argv))
    wall_s = time.perf_counter() - started
    run_dir = Path(summary["run_dir"])
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32).state_dict()
    changed = sum(int((trained[k] != initial[k]).sum()) for k in initial) / sum(v.numel() for v in initial.values())
    provenance = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    pairs = summary["steps"] * provenance["per_device_train_batch_size"] * provenance["gradient_accumulation_steps"]
    result.update(pairs_per_s_train_loop=summary["pairs_per_s"], setup_s=summary["setup_s"],
                  pairs_per_s_whole_run=pairs / wall_s, weights_changed=changed,
                  weights_changed_sampled=(summary.get("weights") or {}).get("weights/changed_share"),
                  fit=provenance["dpolab_provenance"].get("fit_to_memory"),
                  checkpointing=bool(provenance.get("activation_checkpointing")),
                  diagnostics=[f["name"] for f in summary.get("diagnostics", [])],
                  compiled_graphs=compiled_graphs())  # fmt: skip
    if torch.cuda.is_available():
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)  # fmt: skip
    return result


PREPASS_BATCHES = (8, 16, 32)


def reference_passes(trainer, device: str) -> list[dict]:
    """The `reference-prepass` row (and the `dpolab-fast-compile` row after training): the reference pre-pass alone,
    as `dpolab train` runs it before the first step (its first run, at set-up, paid loading and compiling), again
    at TRL's `precompute_ref_batch_size` 8 (its default here: the training micro-batch), 16 and 32: pairs/s and
    peak memory of each, and how far the larger batches' log-probs are from batch 8's (other packing neighbours)."""
    import torch

    passes, first = [], None
    for batch in PREPASS_BATCHES:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pairs_per_s, logps = timed_reference_pass(trainer, device, batch)
        values = logps["chosen"] + logps["rejected"]
        first = first or values
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        passes.append({"batch": batch, "pairs_per_s": pairs_per_s, "peak_allocated_gib": peak,
                       "max_abs_diff_vs_batch_8": max(abs(a - b) for a, b in zip(values, first))})  # fmt: skip
    return passes


def timed_reference_pass(trainer, device: str, batch: int) -> tuple[float, dict]:
    """One reference pass over the row's training pairs, as `dpolab train`'s pre-pass runs it: pairs/s and the
    log-probs."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    logps = trainer.reference_pass(trainer.train_dataset, "train", batch)  # reads its results: waits for the device
    return len(logps["chosen"]) / (time.perf_counter() - started), logps


def with_reference_pass(pairs_per_s: float, reference_pairs_per_s: float | None) -> float:
    """A run's pairs/s when its one reference pass over the same pairs is counted (a single run on new data; a
    second run or a sweep reads the pass from the cache)."""
    if reference_pairs_per_s is None:
        return pairs_per_s
    return 1 / (1 / pairs_per_s + 1 / reference_pairs_per_s)


# --- the table ----------------------------------------------------------------------------------------------------


def window_means(losses: list[float], logged_steps: list[int]) -> list[float]:
    """Per-step losses (steps 1..N) averaged over the windows a run logged at `logged_steps` (what transformers
    logs: the mean step loss since the last log), so a row logging every 10 steps compares with TRL's default."""
    starts = [0] + logged_steps[:-1]
    return [sum(losses[start:end]) / (end - start) for start, end in zip(starts, logged_steps)]


def row_batch(row: str) -> int:
    """Pairs per step (one micro-batch) of a bench row."""
    return ROW_FIELDS.get(row, {}).get("per_device_train_batch_size", 8)


def largest_micro_batch(layout: list[tuple[int, int, int]], batch: int, steps: int, packed: bool,
                        row_multiple: int = 1) -> int:  # fmt: skip
    """Tokens in the largest micro-batch a row met over `steps` sequential batches: packed (each prompt once, the
    row rounded up to `row_multiple`) or TRL's padded rows (chosen and rejected padded to the longest)."""
    batches = [layout[i : i + batch] for i in range(0, min(steps * batch, len(layout) - batch + 1), batch)]
    if packed:
        return max(-(-sum(p + c + r for p, c, r in b) // row_multiple) * row_multiple for b in batches)
    return max(2 * batch * max(p + max(c, r) for p, c, r in b) for b in batches)


def planned(row: dict, layout: list[tuple[int, int, int]], steps: int) -> float | None:
    """`dpolab plan`'s peak reserved (GiB) for a row, for the largest micro-batch the row really ran (the sequential
    sampler starts the data again after its last pair)."""
    from dpolab import packing, plan

    model = plan.model_shape(row["model"])
    fields, batch = ROW_FIELDS.get(row["row"], {}), row_batch(row["row"])
    compiled = fields.get("torch_compile", False) or row["row"] == WHOLE_BACKBONE_ROW  # compiled in run_row
    accumulation = 1
    if row["row"] == "cli-full":  # its 12 steps of 8 x 2 (run_cli_row), compiled on a GPU (choose_torch_compile)
        batch, accumulation, compiled = 8, 2, row.get("device", "cuda") == "cuda"
        tokens = largest_micro_batch(layout, batch, 12 * accumulation, packed=True, row_multiple=64)
    elif row["row"] in ("trl-default", "trl-bf16-precompute"):  # (eager attention's scores: not planned)
        tokens = largest_micro_batch(layout, batch, steps, packed=False)
    elif row["row"].startswith("dpolab-fast"):
        multiple = packing.row_multiple(compiled, fields.get("torch_compile_mode"), fields.get("pad_to_multiple_of"))
        tokens = largest_micro_batch(layout, batch, steps, packed=True, row_multiple=multiple)
    else:
        return None
    shape = plan.RunShape(batch=batch, max_length=1024, accumulation=accumulation,
                          checkpointing=row.get("checkpointing", False),
                          weight_bytes=2 if "bf16" in row["row"] else 4, autocast=True,
                          precompute_ref=row["row"] != "trl-default", tokens=tokens, compiled=compiled,
                          dense_mask=fields.get("attn_implementation") == "sdpa",
                          grouped_kv=fields.get("attn_implementation") == "varlen_attn")  # fmt: skip
    return plan.peak_reserved(model, shape) / 2**30


HEADER = ("row", "pairs/s", "x TRL default", "pairs/s with the reference pass", "x TRL default so", "MFU %",
          "peak allocated GiB", "peak reserved GiB", "plan GiB", "weights changed %", "set-up s", "first step s",
          "frames compiled", "max abs loss diff vs TRL default")  # fmt: skip


def table(rows: list[dict], layout, args) -> str:
    tokens_per_pair = sum(2 * p + c + r for p, c, r in layout) / len(layout)  # TRL's count: prompt in both rows
    params = 494_032_768 if args.device == "cuda" else None
    peak = PEAK_TFLOPS[args.device]
    base = next((row for row in rows if row["row"] == "trl-default" and "error" not in row), None)
    lines = [
        f"{len(layout)} pairs, {tokens_per_pair:.0f} real tokens per pair (TRL's count), batch 8, max_length 1024, "
        f"{args.steps} steps, pairs/s over steps 9-{args.steps} (cli rows: the whole training loop, compilation "
        "included); set-up s: data, model and the reference pre-pass, before the first step; with the reference pass: "
        "the row's pairs/s with one reference pass over the same pairs counted (timed after training, warm), as a "
        "single run on new data pays it (TRL's default computes the reference in each step)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| --- |" + " ---: |" * (len(HEADER) - 1),
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['row']} | failed: {row['error'][:150]} |" + " |" * (len(HEADER) - 2))
            continue
        rate = row.get("pairs_per_s") or row.get("pairs_per_s_train_loop")
        mfu = 100 * rate * tokens_per_pair * 8 * params / (peak * 1e12) if params and peak and rate else None
        same_workload = base and row_batch(row["row"]) == 8  # a batch-16 row trains other steps
        ratio = row["pairs_per_s"] / base["pairs_per_s"] if same_workload and row.get("pairs_per_s") else None
        whole = with_reference_pass(row["pairs_per_s"], row.get("reference_pairs_per_s")) if ratio else None
        whole_ratio = whole / base["pairs_per_s"] if whole else None  # TRL's default computes it in each step
        diff = None
        if same_workload and row.get("losses"):
            diff = max(abs(a - b) for a, b in zip(row["losses"], window_means(base["losses"], row["loss_steps"])))
        if row.get("losses") or row["row"] == "cli-full":
            plan_gib = planned({**row, "model": args.model_dir, "device": args.device}, layout, args.steps)
        else:
            plan_gib = (row.get("fit") or {}).get("planned_peak_gib")
        changed = 100 * row["weights_changed"] if row.get("weights_changed") is not None else None
        frames = (row.get("compiled_graphs") or {}).get("frames")  # grows with the steps if layers recompile
        cells = [rate, ratio, whole, whole_ratio, mfu, row.get("peak_allocated_gib"), row.get("peak_reserved_gib"),
                 plan_gib, changed, row.get("setup_s"), row.get("first_step_s"), frames]  # fmt: skip
        formats = [".1f", ".2f", ".1f", ".2f", ".1f", ".2f", ".2f", ".2f", ".2f", ".1f", ".1f", "d"]
        text = ["-" if value is None else format(value, spec) for value, spec in zip(cells, formats)]
        lines.append(f"| {row['row']} | " + " | ".join(text) + f" | {'-' if diff is None else format(diff, '.2e')} |")
    for row in rows:
        if row["row"] == "flex-attention" and "variants" in row:
            import flex_attention

            lines.append("\n" + flex_attention.text(row))
        if row.get("reference_pass_error"):
            lines.append(f"\n{row['row']}: its reference pass failed: {row['reference_pass_error']}")
        if row.get("pairs_per_s_replayed"):
            rate = row["pairs_per_s_replayed"]
            mfu = 100 * rate * tokens_per_pair * 8 * params / (peak * 1e12) if params and peak else None
            mfu_text = f", MFU {mfu:.1f}%" if mfu else ""
            lines.append(f"\n{row['row']}: over the {row['replayed_steps']} steps after step 8 that replayed "
                         f"recorded CUDA graphs (their row length met twice before; row lengths met: "
                         f"{len(row['row_lengths'])}): {rate:.1f} pairs/s{mfu_text}")  # fmt: skip
        for reason in row.get("cudagraph_skip_reasons", []):  # the row ran (partly) without its CUDA graphs
            lines.append(f"\n{row['row']}: inductor: {reason}")
        for one in row.get("passes", []):  # the reference-prepass and dpolab-fast-compile rows
            allocated = "-" if one["peak_allocated_gib"] is None else f"{one['peak_allocated_gib']:.2f}"
            diff = one["max_abs_diff_vs_batch_8"]
            lines.append(f"\n{row['row']}: reference pass at batch {one['batch']}: {one['pairs_per_s']:.1f} pairs/s, "
                         f"peak allocated {allocated} GiB, max abs diff from batch 8 {diff:.2e}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--work", default=None, help="working directory (model, data, runs)")
    parser.add_argument("--rows", default=",".join(REQUIRED_ROWS + OPTIONAL_ROWS))
    parser.add_argument("--budget_s", type=float, default=330, help="skip optional rows past this many seconds")
    parser.add_argument("--deadline_s", type=float, default=None, help="stop all rows this many seconds in")
    parser.add_argument("--row_cap_s", type=float, default=None, help="stop any one row this many seconds in")
    parser.add_argument("--profile", action="store_true", help="profile steps 13-16 of each row (profiles.txt)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    args.work = args.work or str(Path(args.out) / "work")
    if args.row:
        try:
            result = run_row(args)
        except Exception as error:  # one failed row must not lose the others' numbers
            import traceback

            traceback.print_exc()
            result = {"row": args.row, "error": f"{type(error).__name__}: {error}"}
        (Path(args.work) / f"{args.row}.json").write_text(json.dumps(result, indent=2))
        return
    started = time.time()
    work = Path(args.work)
    clear_previous_results(work)
    work.mkdir(parents=True, exist_ok=True)
    world = build_world(work, args.device, pairs=max(args.steps * 8, 24 * 16) + 16)
    (work / "world.json").write_text(json.dumps(world))
    args.model_dir = world["model"]
    layout = token_layout(world, 1024)
    print(f"world ready in {time.time() - started:.0f} s", flush=True)
    rows, out = [], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiles.txt").unlink(missing_ok=True)  # the rows append to it
    for name in args.rows.split(","):
        spent = time.time() - started
        left = None if args.deadline_s is None else args.deadline_s - spent
        if (name in OPTIONAL_ROWS and spent > args.budget_s) or (left is not None and left < MIN_ROW_S):
            print(f"skipping {name}: {spent:.0f} s spent", flush=True)
            continue
        row_started = time.time()
        command = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--work",
                   str(work), "--out", args.out, "--row", name] + ["--profile"] * args.profile  # fmt: skip
        stretch = WHOLE_BACKBONE_CAP if name in WHOLE_BACKBONE_ROWS else 1
        row_cap = None if args.row_cap_s is None else args.row_cap_s * stretch
        caps = [cap for cap in (left, row_cap) if cap is not None]  # a hung row must not take the others' time
        finished = run_row_process(command, timeout=min(caps, default=None))
        path = work / f"{name}.json"
        if not finished:
            rows.append({"row": name, "error": f"stopped after {time.time() - row_started:.0f} s (deadline or cap)"})
        else:
            rows.append(json.loads(path.read_text()) if path.is_file() else {"row": name, "error": "no result"})
        rows[-1]["wall_s"] = round(time.time() - row_started, 1)
        print(f"== {name}: {time.time() - row_started:.0f} s", json.dumps({k: v for k, v in rows[-1].items()
                                                                           if k != "losses"}), flush=True)  # fmt: skip
        (out / "rows.json").write_text(json.dumps(rows, indent=2))
        (out / "table.md").write_text(table(rows, layout, args) + "\n")  # after every row: a cut-off call keeps it
    print(table(rows, layout, args))
    print(f"total {time.time() - started:.0f} s")


def clear_previous_results(work: Path) -> None:
    """A second call on a warm machine reuses the work directory: its runs would make the CLI rows refuse to start
    (run directories are never overwritten) and a row that died without a result would report the last call's."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    for result in work.glob("*.json"):
        result.unlink()


def run_row_process(command: list[str], timeout: float | None) -> bool:
    """Run one row's process; past `timeout` kill it with everything it started (inductor's compile workers
    too, which hold no GPU memory but would outlive it). Whether it finished."""
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


if __name__ == "__main__":
    main()
