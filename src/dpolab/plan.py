"""`dpolab plan`: peak GPU memory of a DPO run by component, and a setting that fits the card.

Pure arithmetic over the model's shape and the run's settings (no torch import, no model load). Tokens per
step are 2 x batch x max_length: DPOTrainer runs chosen and rejected as one batch.
"""

from __future__ import annotations

import json
import math
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
CUDA_OVERHEAD_BYTES = 1 * GIB  # CUDA context, cuBLAS workspace and allocator slack: a fixed allowance


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
    def params(self) -> int:
        """Parameters of a Llama/Qwen2-style decoder: embeddings, attention, SwiGLU MLP, RMSNorms, LM head."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        per_layer = attention + 3 * h * i + 2 * h
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + h


@dataclass(frozen=True)
class RunShape:
    batch: int  # per-device pairs
    max_length: int
    accumulation: int
    checkpointing: bool
    weight_bytes: int
    peft: bool = False
    lora_r: int = 16
    precompute_ref: bool = False


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


def activation_bytes_per_token_layer(model: ModelShape) -> int:
    """What autograd keeps per token and decoder layer in bf16, with SDPA/flash attention (no s^2 term).

    Two RMSNorms keep their fp32 input (2 x 4h bytes) and bf16 output (2 x 2h); q, k, v before and after
    rotary (2 x (h + 2kv) x 2); the attention output (2h); the SwiGLU MLP's gate, up, activation and product
    (4 x 2i).
    """
    h, kv, i = model.hidden, model.kv_dim, model.intermediate
    return 2 * 4 * h + 2 * 2 * h + 2 * (h + 2 * kv) * 2 + 2 * h + 4 * 2 * i


def estimate(model: ModelShape, run: RunShape) -> dict[str, int]:
    """Peak memory by component, in bytes."""
    tokens = 2 * run.batch * run.max_length  # chosen + rejected
    if run.peft:  # LoRA on q_proj and v_proj (peft's default for these models), adapters and Adam kept in fp32
        trainable = model.layers * run.lora_r * ((model.hidden + model.hidden) + (model.hidden + model.kv_dim))
        gradients, optimizer = trainable * 4, trainable * 8
    else:
        trainable = model.params
        gradients, optimizer = trainable * run.weight_bytes, 2 * trainable * run.weight_bytes  # AdamW m and v
    per_layer = activation_bytes_per_token_layer(model)
    if run.checkpointing:  # each layer's input is kept; one layer is recomputed at a time during backward
        activations = tokens * (model.layers * 2 * model.hidden + per_layer)
    else:
        activations = tokens * model.layers * per_layer
    return {
        "weights (policy)": model.params * run.weight_bytes,
        "gradients": gradients,
        "optimizer states (AdamW)": optimizer,
        "reference model": 0 if (run.peft or run.precompute_ref) else model.params * run.weight_bytes,
        f"activations ({'checkpointed' if run.checkpointing else 'all layers kept'})": activations,
        "logits (vocab x tokens, fp32 upcast)": tokens * model.vocab * 4,
        "logits gradient (backward, fp32)": tokens * model.vocab * 4,
        "CUDA context and allocator slack": CUDA_OVERHEAD_BYTES,
    }


def recommend(model: ModelShape, run: RunShape, budget_bytes: int) -> RunShape | None:
    """The largest per-device batch that fits, keeping the global batch; without checkpointing when it fits."""
    global_batch = run.batch * run.accumulation
    for batch in sorted({b for b in (64, 32, 16, 8, 4, 2, 1) if b <= global_batch} | {run.batch}, reverse=True):
        for checkpointing in (False, True):
            candidate = replace(
                run, batch=batch, accumulation=math.ceil(global_batch / batch), checkpointing=checkpointing
            )
            if sum(estimate(model, candidate).values()) <= budget_bytes:
                return candidate
    return None


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


def run_shape(train) -> RunShape:
    """The memory-relevant settings of a resolved train config."""
    training, model = train.training, train.model
    return RunShape(
        batch=training.per_device_train_batch_size, max_length=training.max_length or 1024,
        accumulation=training.gradient_accumulation_steps, checkpointing=bool(training.activation_checkpointing),
        weight_bytes=DTYPE_BYTES[model.dtype or "float32"], peft=bool(model.use_peft), lora_r=model.lora_r,
        precompute_ref=bool(training.precompute_ref_log_probs),
    )  # fmt: skip


def model_config(name: str) -> dict:
    """config.json of a known model, a local directory, or a Hub model already in the local cache."""
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    path = Path(name)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    raise DpolabError(
        f"No config for '{name}': not a known model ({', '.join(KNOWN_CONFIGS)}), a local directory with "
        f"config.json, or a cached Hub model."
    )


def run(config: PlanConfig) -> int:
    name = config.train.model.model_name_or_path
    if not name:
        raise DpolabError("Which model? Give --model_name_or_path, a --preset or a --config.")
    model_config_values = model_config(name)
    try:
        model = shape_from_config(model_config_values)
    except KeyError as missing:
        raise DpolabError(
            f"{name}: config.json lacks {missing}; plan knows decoder-only (Llama/Qwen2-style) models."
        ) from None
    shape = run_shape(config.train)
    budget = int(config.gpu_memory_gib * GIB)
    components = estimate(model, shape)
    print(f"{name}: {model.params / 1e6:.0f}M parameters, vocabulary {model.vocab:,}, {model.layers} layers")
    on_off = lambda flag: "on" if flag else "off"  # noqa: E731
    print(f"settings: batch {shape.batch} x accumulation {shape.accumulation}, max_length "
          f"{shape.max_length}, {config.train.model.dtype} weights, checkpointing {on_off(shape.checkpointing)}, "
          f"LoRA {on_off(shape.peft)}, precomputed reference {on_off(shape.precompute_ref)}")  # fmt: skip
    print(format_components(components))
    total = sum(components.values())
    fits = total <= budget
    print(f"  {'estimated peak':<42}{total / GIB:>8.2f} GiB  -> {'fits' if fits else 'does NOT fit'} "
          f"{config.gpu_memory_gib:g} GiB")  # fmt: skip
    print("  (logits: TRL 1.16 scores them through a fused, chunked LM head, so the real peak can be lower)")
    best = recommend(model, shape, budget)
    if best is None:
        print(f"\nNothing fits {config.gpu_memory_gib:g} GiB at max_length {shape.max_length}: try use_peft true, "
              "precompute_ref_log_probs true, a shorter max_length, or bf16 weights (dtype bfloat16).")  # fmt: skip
        return 1
    best_total = sum(estimate(model, best).values())
    print(f"\nrecommended for {config.gpu_memory_gib:g} GiB (same global batch {best.batch * best.accumulation}): "
          f"--per_device_train_batch_size {best.batch} --gradient_accumulation_steps {best.accumulation} "
          f"--activation_checkpointing {str(best.checkpointing).lower()}   (~{best_total / GIB:.1f} GiB)")  # fmt: skip
    return 0


def format_components(components: dict[str, int]) -> str:
    return "\n".join(f"  {name:<42}{value / GIB:>8.2f} GiB" for name, value in components.items())
