"""`dpolab plan`: peak GPU memory of a DPO run by component, and a setting that fits the card.

The arithmetic (`estimate`, `fit`) is pure: the model's shape, the run's settings and how many tokens a
micro-batch holds. TRL's padded batches hold 2 x batch x (longest sequence) tokens; dpolab's packed batches
hold the pairs' real tokens with each prompt once. `dpolab plan` and `dpolab train` (fit_to_memory) plan for the
largest micro-batch the run is likely to meet (`batch_token_peak`: 20 runs of as many micro-batches, simulated on
its data); `dpolab plan` without the data at hand, for the worst case (every sequence max_length long).

What the estimate counts at the peak (the start of the backward pass, when every activation is still alive): the
weights, their bf16 copies under autocast, AdamW's two states, the gradients (all of them when gradient accumulation
keeps them between micro-batches, else the LM head's, allocated first), the reference model when it is kept, the
activations autograd saves, TRL's chunked LM head (one fp32 logits tile and an fp32 gradient accumulator for the
head: the full logits never exist), and under SDPA the packed row's dense mask. Reserved memory adds the CUDA
allocator's slack and the CUDA context. Against an H100's measurements (bench/RESULTS.md): peak allocated within
0.04 GiB for TRL's default and the fast path, eager and compiled, where the run's largest micro-batch is known; peak
reserved +0% to +15% for those and the smoke and full presets (which plan for the largest micro-batch of 20
simulated runs as long as theirs, more than most of their runs meet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from dpolab.errors import DpolabError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# Shapes of models people plan for before they have them locally (config.json fields).
KNOWN_CONFIGS = {
    "Qwen/Qwen2-0.5B-Instruct": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    },
}  # fmt: skip
KNOWN_CONFIGS["Qwen/Qwen2-0.5B"] = KNOWN_CONFIGS["Qwen/Qwen2-0.5B-Instruct"]
# TRL's chunked LM head (trl/kernels/chunked_logprob.py): tiles of this many tokens x vocabulary columns, in fp32.
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768
# The CUDA allocator reserves more than it hands out (block rounding, fragmentation), plus the CUDA context.
RESERVED_FACTOR = 1.10
CUDA_CONTEXT_BYTES = GIB // 2


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, SwiGLU MLP, two RMSNorms."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h

    @property
    def params(self) -> int:
        """Parameters of a Llama/Qwen2-style decoder: embeddings, decoder layers, final RMSNorm, LM head."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden


@dataclass(frozen=True)
class RunShape:
    batch: int  # pairs per micro-batch, per device
    max_length: int
    accumulation: int
    checkpointing: bool
    weight_bytes: int
    peft: bool = False
    lora_r: int = 16
    precompute_ref: bool = False
    autocast: bool = False  # bf16/fp16 autocast over the weights (matters when they are float32)
    compiled: bool = False  # decoder layers compiled by inductor (`torch_compile`): fewer activations kept
    tokens: int | None = None  # tokens in one micro-batch (None: the worst case, 2 x batch x max_length)
    dense_mask: bool = False  # the fast path's packed row under SDPA: one tokens x tokens mask, kept for the backward
    grouped_kv: bool = False  # the fast path's packed row under varlen_attn: K/V kept grouped, gathered per sequence

    @property
    def micro_batch_tokens(self) -> int:
        return self.tokens if self.tokens is not None else 2 * self.batch * self.max_length


def shape_from_config(config: dict) -> ModelShape:
    return ModelShape(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
    )


def activation_bytes_per_token_layer(
    model: ModelShape, residual_bytes: int = 2, compiled: bool = False, grouped_kv: bool = False
) -> int:
    """What autograd keeps per token and decoder layer, with flash/SDPA/Flex attention (no T^2 term): the tensors
    a Qwen2 layer saves for its backward, counted one by one (tests/test_doctor_plan.py counts them on the CPU).

    residual_bytes: 2 for bf16 weights, 4 for float32 weights under bf16 autocast (the residual stream stays float32).
    Attention keeps q, its output, its float32 logsumexp per head, and k and v as the kernel reads them: repeated to
    every query head when the query heads are not a power of two, as transformers does for FlexAttention, the fast
    path's attention on a GPU (SDPA with a mask, TRL's padded path, repeats them for any head count: not counted
    for power-of-two models).
    Eager: each RMSNorm keeps its float32 input, normalised output and float32 inverse RMS; each projection its
    bf16 input (under autocast each of q, k, v, gate and up casts its own; bf16 weights share one per norm); the
    SwiGLU MLP keeps gate, up, their activation and product.
    Compiled (inductor, `torch_compile`): the layer's input, the norms' inverse RMS, the bf16 inputs of the
    attention, o_proj and the MLP, attention as eager, and the MLP's gate, up and product; its partitioner
    recomputes the rest in the backward pass.
    grouped_kv (`varlen_attn`): k and v kept as their heads are, gathered per sequence, a prompt's twice (counted
    twice: an upper bound; under the CUDA-graph modes the count, the keys padded to twice the row), never repeated.
    Against the H100's peak allocated (bench/RESULTS.md): within 0.02 GiB of the fast path's, eager and compiled.
    """
    h, kv, i = model.hidden, model.kv_dim, model.intermediate
    repeated = model.kv_heads < model.heads and model.heads & (model.heads - 1) != 0 and not grouped_kv
    attention = 2 * 2 * h + 2 * 2 * (2 * kv if grouped_kv else h if repeated else kv) + 4 * model.heads
    if compiled:
        return residual_bytes * h + 2 * 4 + 3 * 2 * h + attention + 3 * 2 * i
    projection_inputs = 5 if residual_bytes == 4 else 2
    return 2 * (4 * h + residual_bytes * h + 4) + projection_inputs * 2 * h + attention + 4 * 2 * i


def lora_parameters(model: ModelShape, rank: int) -> int:
    """LoRA A and B on q_proj and v_proj (peft's default targets for these models)."""
    return model.layers * rank * ((model.hidden + model.hidden) + (model.hidden + model.kv_dim))


def estimate(model: ModelShape, run: RunShape) -> dict[str, int]:
    """Peak allocated memory by component, in bytes (the start of the backward pass)."""
    tokens = run.micro_batch_tokens
    trainable = lora_parameters(model, run.lora_r) if run.peft else model.params
    trainable_bytes = 4 if run.peft else run.weight_bytes  # peft keeps adapters (and their Adam states) in fp32
    # With accumulation 1 only the head's gradient exists at the peak; for float32 weights TRL's fp32 head-gradient
    # accumulator (counted with the LM head below) is that gradient, for bf16 weights a bf16 copy is made.
    head_gradient = 0 if run.peft or run.weight_bytes == 4 else model.vocab * model.hidden * run.weight_bytes
    residual_bytes = 4 if run.weight_bytes == 4 else 2
    per_layer = activation_bytes_per_token_layer(model, residual_bytes, run.compiled, run.grouped_kv)
    if run.checkpointing:  # each layer keeps its input; one layer is recomputed at a time during backward
        activations = tokens * (model.layers * residual_bytes * model.hidden + per_layer)
    else:
        activations = tokens * model.layers * per_layer
    scored = tokens // 2  # the head scores completion tokens only: at most about half of a micro-batch
    head_tile = min(scored, HEAD_TILE_TOKENS) * min(model.vocab, HEAD_TILE_VOCAB) * 4
    # autocast's bf16 copies of float32 weights live while an op keeps them for the backward: every layer's when the
    # activations are kept; with checkpointing the forward keeps nothing and one layer is recomputed at a time (on
    # the H100, TRL's default row was 0.93 GiB under the plan that counted them all)
    copies = (model.layer_params if run.checkpointing else model.params) * 2
    kept = run.accumulation > 1 or run.peft
    if kept:
        gradients = "gradients"
    elif run.weight_bytes == 4:  # the head's fp32 accumulator is counted with the head
        gradients = "gradients (at the peak: the LM head's, in its line below)"
    else:
        gradients = "gradients (at the peak: the LM head's bf16 copy)"
    components = {
        "weights (policy)": model.params * run.weight_bytes,
        "bf16 weight copies (autocast)": copies if run.autocast and run.weight_bytes == 4 else 0,
        gradients: trainable * trainable_bytes if kept else head_gradient,
        "optimizer states (AdamW)": 2 * trainable * trainable_bytes,
        "reference model": 0 if (run.peft or run.precompute_ref) else model.params * run.weight_bytes,
        f"activations ({'checkpointed' if run.checkpointing else 'all layers kept'}, {tokens:,} tokens"
        f"{', compiled layers' if run.compiled else ''})": activations,
        "LM head: fp32 logits tile + head gradient": head_tile + model.vocab * model.hidden * 4,
    }
    if run.dense_mask:  # in the dtype SDPA computes in (packing.attention_mask)
        mask_bytes = 2 if run.autocast else run.weight_bytes
        components["attention mask (SDPA: tokens x tokens, one for all layers)"] = tokens * tokens * mask_bytes
    return components


def reserved(allocated: int) -> int:
    """What the CUDA allocator reserves for a peak of `allocated` bytes (calibrated: bench/RESULTS.md)."""
    return int(allocated * RESERVED_FACTOR) + CUDA_CONTEXT_BYTES


def peak_reserved(model: ModelShape, run: RunShape) -> int:
    return reserved(sum(estimate(model, run).values()))


def fit(model: ModelShape, run: RunShape, budget_bytes: int, tokens_for_batch=None) -> RunShape | None:
    """The largest micro-batch that fits the budget, keeping batch x accumulation; without activation
    checkpointing whenever that fits. `tokens_for_batch(b)`: tokens a micro-batch of b pairs holds (None: the
    worst case). None when nothing fits."""
    global_batch = run.batch * run.accumulation
    sizes = sorted({b for b in range(1, global_batch + 1) if global_batch % b == 0}, reverse=True)
    for checkpointing in (False, True):
        for batch in sizes:
            tokens = tokens_for_batch(batch) if tokens_for_batch else None
            candidate = replace(
                run, batch=batch, accumulation=global_batch // batch, checkpointing=checkpointing, tokens=tokens
            )
            if peak_reserved(model, candidate) <= budget_bytes:
                return candidate
    return None


def batch_token_peak(
    pairs: list[tuple[int, int, int]],
    batch: int,
    packed: bool,
    micro_batches: int,
    row_multiple: int = 1,
    runs: int = 20,
) -> int:
    """The largest micro-batch, in tokens, that `runs` simulated runs of `micro_batches` micro-batches each meet: a
    real run of that many meets a larger one with a chance of about 1 in runs + 1 (it and the simulated runs are
    alike, so each of them is as likely as the others to hold the largest).

    pairs: (prompt, chosen, rejected) scored lengths, drawn at random `batch` at a time. Packed: every pair's tokens,
    prompt once, the row rounded up to `row_multiple` as the fast path's collator rounds it. Padded (TRL): chosen and
    rejected rows padded to the batch's longest sequence.
    """
    import numpy

    lengths = numpy.asarray(pairs, dtype=numpy.int64).reshape(-1, 3)
    rng = numpy.random.default_rng(0)
    peak, chunk = 0, max(1, 2**20 // batch)  # at most ~2^20 pairs drawn at once
    for _ in range(runs):
        for start in range(0, micro_batches, chunk):
            drawn = lengths[rng.integers(0, len(lengths), size=(min(chunk, micro_batches - start), batch))]
            if packed:
                tokens = -(-drawn.sum(axis=(1, 2)) // row_multiple) * row_multiple
            else:
                tokens = 2 * batch * (drawn[..., 0] + drawn[..., 1:].max(axis=-1)).max(axis=-1)
            peak = max(peak, int(tokens.max()))
    return peak


# --- the command ----------------------------------------------------------------------------------------------


@dataclass
class PlanConfig:
    """`dpolab plan`: train's own fields (a preset, a YAML file, `--field value`) plus the card's memory."""

    train: object  # dpolab.config.TrainConfig (TRL's dataclasses: imported lazily)
    gpu_memory_gib: float = 24.0

    @classmethod
    def from_argv(cls, argv: list[str]) -> PlanConfig:
        from dpolab.config import parse_train_args, pop_option

        argv = list(argv)
        memory = pop_option(argv, "--gpu_memory_gib")
        try:
            gpu_memory_gib = float(memory) if memory is not None else cls.gpu_memory_gib
        except ValueError:
            raise DpolabError(f"--gpu_memory_gib takes a number of GiB, got {memory!r}.") from None
        return cls(train=parse_train_args(argv, require_data=False), gpu_memory_gib=gpu_memory_gib)

    @staticmethod
    def usage(prog: str) -> str:
        return (
            f"usage: {prog} (--preset NAME | --config FILE.yaml) [--field value ...] [--gpu_memory_gib GIB]\n\n"
            f"{__doc__.splitlines()[0]}\nTakes every field `dpolab train` takes (see `dpolab train --help`); "
            "--gpu_memory_gib is the card's memory (default 24)."
        )


def run_shape(train, attention: str) -> RunShape:
    """The memory-relevant settings of a resolved train config, whose policy loads with `attention` (the fast path's
    packed row keeps a dense mask under sdpa)."""
    training, model = train.training, train.model
    return RunShape(
        batch=training.per_device_train_batch_size, max_length=training.max_length or 1024,
        accumulation=training.gradient_accumulation_steps, checkpointing=bool(training.activation_checkpointing),
        weight_bytes=DTYPE_BYTES[model.dtype or "float32"], peft=bool(model.use_peft), lora_r=model.lora_r,
        precompute_ref=bool(training.precompute_ref_log_probs), autocast=bool(training.bf16 or training.fp16),
        compiled=bool(training.torch_compile),
        dense_mask=train.script.fast_path and training.truncation_mode == "keep_start" and attention == "sdpa",
        grouped_kv=attention == "varlen_attn",  # packing.VARLEN_ATTENTION (not imported here: packing loads torch)
    )  # fmt: skip


def model_config(name: str) -> dict:
    """config.json of a known model, a local directory, a .gguf file, or a Hub model already in the local cache."""
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():  # its metadata, read without converting the weights
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    raise DpolabError(
        f"No config for '{name}': not a known model ({', '.join(KNOWN_CONFIGS)}), a local directory with "
        f"config.json, a .gguf file, or a cached Hub model."
    )


def model_shape(name: str) -> ModelShape:
    try:
        return shape_from_config(model_config(name))
    except KeyError as missing:
        raise DpolabError(
            f"{name}: config.json lacks {missing}; plan knows decoder-only (Llama/Qwen2-style) models."
        ) from None


def run(config: PlanConfig) -> int:
    from dpolab.train import choose_reference_pass, compile_off_reason, micro_batch_token_peaks, planned_steps

    train, name = config.train, config.train.model.model_name_or_path
    if not name:
        raise DpolabError("Which model? Give --model_name_or_path, a --preset or a --config.")
    model = model_shape(name)
    print(f"{name}: {model.params / 1e6:.0f}M parameters, vocabulary {model.vocab:,}, {model.layers} layers")
    data, missing = run_data(train)
    # on the card FlexAttention, unless another attention is given (train.attention_implementation), and compiled
    # layers for the fast path unless torch_compile was given (train.choose_torch_compile)
    attention = train.model.attn_implementation or "flex_attention"
    compiled = (
        bool(train.training.torch_compile) if "torch_compile" in train.given else compile_off_reason(train) is None
    )
    tokens_for_batch = None
    if data is not None:
        lengths, pairs = data
        choose_reference_pass(train, pairs)
        tokens_for_batch = micro_batch_token_peaks(train, lengths, pairs, attention, compiled)
        tokens_from = (f"the largest a run of {planned_steps(train.training, pairs):,} steps is likely to meet, "
                       f"simulated on the token lengths of {len(lengths.prompt):,} of the {pairs:,} train pairs (as "
                       "`dpolab train` plans)")  # fmt: skip
    else:
        tokens_from = f"every sequence max_length long (the worst case): {missing}"
        if "precompute_ref_log_probs" not in train.given and train.training.max_steps > 0:
            train.training.precompute_ref_log_probs = False  # train's rule needs the data's size: the larger case
    shape = run_shape(train, attention)
    # float32 weights train under bf16 autocast on the card (this machine may say otherwise)
    shape = replace(shape, autocast=shape.autocast or train.model.dtype == "float32", compiled=compiled,
                    tokens=tokens_for_batch(shape.batch) if tokens_for_batch else None)  # fmt: skip
    budget = int(config.gpu_memory_gib * GIB)
    components = estimate(model, shape)
    on_off = lambda flag: "on" if flag else "off"  # noqa: E731
    print(f"settings: batch {shape.batch} x accumulation {shape.accumulation}, max_length "
          f"{shape.max_length}, {train.model.dtype} weights (bf16 autocast {on_off(shape.autocast)}), "
          f"checkpointing {on_off(shape.checkpointing)}, LoRA {on_off(shape.peft)}, precomputed reference "
          f"{on_off(shape.precompute_ref)}, compiled layers {on_off(shape.compiled)}")  # fmt: skip
    print(f"micro-batch: {shape.micro_batch_tokens:,} tokens, {tokens_from}")
    print(format_components(components))
    mode = train.training.torch_compile_mode
    if shape.compiled and mode:
        from dpolab.packing import records_cuda_graphs  # imports torch: only where a mode is set

        if records_cuda_graphs(shape.compiled, mode):
            print(f"  not counted: the memory pool of the CUDA graphs that torch_compile_mode {mode} records (one "
                  "per row length; not measured yet)")  # fmt: skip
    allocated = sum(components.values())
    total = reserved(allocated)
    print(f"  {'allocator slack and CUDA context':<58}{(total - allocated) / GIB:>8.2f} GiB")
    print(f"  {'estimated peak reserved':<58}{total / GIB:>8.2f} GiB  -> "
          f"{'fits' if total <= budget else 'does NOT fit'} {config.gpu_memory_gib:g} GiB")  # fmt: skip
    best = fit(model, shape, budget, tokens_for_batch)
    if best is None:
        print(f"\nNothing fits {config.gpu_memory_gib:g} GiB at max_length {shape.max_length}: try use_peft true, "
              "a shorter max_length, or fewer pairs per optimizer step.")  # fmt: skip
        return 1
    tokens = f", {best.tokens:,} tokens" if best.tokens else ""
    print(f"\nrecommended for {config.gpu_memory_gib:g} GiB (same global batch {best.batch * best.accumulation}): "
          f"--per_device_train_batch_size {best.batch} --gradient_accumulation_steps {best.accumulation} "
          f"--activation_checkpointing {str(best.checkpointing).lower()}   "
          f"(~{peak_reserved(model, best) / GIB:.1f} GiB{tokens})")  # fmt: skip
    if tokens_for_batch:
        print("`dpolab train` chooses the same on a card with this much memory (fit_to_memory, --gpu_memory_gib).")
    else:
        print("`dpolab train` makes this choice itself (fit_to_memory), for the largest micro-batch its data is "
              "likely to give in a run of its length, which is smaller than this worst case: it often fits more "
              "pairs per micro-batch.")  # fmt: skip
    return 0


def run_data(train) -> tuple[tuple[object, int] | None, str | None]:
    """((the token lengths of a sample of the run's train pairs, how many pairs), None), read as `dpolab train`
    reads them; (None, why) when the data or its tokenizer is not at hand here."""
    if not train.script.dataset_name:
        return None, "no dataset_name to plan for"
    from dpolab.train import check_tokens, load_train_eval, locate_model

    try:
        _, tokenizer = locate_model(train)
        print(f"Reading {train.script.dataset_name} to plan for its token lengths", flush=True)
        train_pairs, _ = load_train_eval(train)
        lengths = check_tokens(train, tokenizer, train_pairs)
    except DpolabError as error:
        reason = str(error).splitlines()[0].split(". ")[0]  # its first sentence: what is missing
        return None, f"the data or its tokenizer is not at hand here ({reason})"
    return (lengths, len(train_pairs.dataset)), None


def format_components(components: dict[str, int]) -> str:
    return "\n".join(f"  {name:<58}{value / GIB:>8.2f} GiB" for name, value in components.items())
