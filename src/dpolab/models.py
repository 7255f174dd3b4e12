"""Models: where they are, and loading a policy, a reference, a LoRA adapter or a .gguf, plus TRL glue.

`resolve_model` finds where a model lives (a Hub id, a local directory, or a .gguf file converted once into a
safetensors directory) without loading its weights, so a missing model fails before any data is read; every
workflow then loads from the directory it returns through the loaders below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from dpolab.errors import DpolabError


def cache_dir() -> Path:
    return Path(os.environ.get("DPOLAB_CACHE", Path.home() / ".cache" / "dpolab")).expanduser()


def resolve_model(
    name_or_path: str, *, revision: str = "main", trust_remote_code: bool = False, allow_pickle: bool = False
) -> str:
    """A local directory holding the model (a converted GGUF, a given directory, or a Hub snapshot) or a Hub id."""
    located = _locate_model(name_or_path, revision, trust_remote_code)
    if Path(located).is_dir() and not allow_pickle:
        check_no_pickle_only(Path(located))
    return located


def check_no_pickle_only(directory: Path) -> None:
    """Weights only as pickle (.bin/.pt) can execute code when unpickled: refuse them unless asked."""
    if list(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth") and "model" in p.name)
    if pickles:
        raise DpolabError(
            f"{directory} holds its weights only as pickle ({', '.join(pickles)}), which can run code when loaded. "
            f"Convert it to safetensors (load it once you trust it, then `save_pretrained`), or pass "
            f"--allow_pickle_weights true if you trust its source."
        )


def _locate_model(name_or_path: str, revision: str, trust_remote_code: bool) -> str:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DpolabError(f"GGUF file not found: {name_or_path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DpolabError(
                f"{name_or_path} is not a model directory: it has no config.json. Point at a directory written "
                f"by `save_pretrained` (config.json + *.safetensors + tokenizer files), or at a .gguf file."
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip(os.sep).replace("/", "", 1):
        raise DpolabError(f"Model directory not found: {name_or_path}")
    return _resolve_hub_model(name_or_path, revision, trust_remote_code)


def _resolve_hub_model(model_id: str, revision: str, trust_remote_code: bool) -> str:
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig

    from dpolab.hub import hub_reachable

    if hub_reachable():
        try:
            AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise DpolabError(f"Model '{model_id}' could not be found on the Hub: {error}") from None
        return model_id
    try:
        # Offline: use the cached snapshot directly, so nothing below waits on network retries.
        return snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends
        raise DpolabError(
            f"Model '{model_id}' is not in the local Hugging Face cache and the Hub is not reachable. Download it "
            f"where there is network (`hf download {model_id}`) and copy the cache over, or point "
            f"--model_name_or_path at a local directory holding config.json, the weights and the tokenizer."
        ) from None


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a .gguf file once into a plain safetensors model directory (cached), and return it.

    A model loaded with `gguf_file=` keeps a GGUF quantizer attached and DPOTrainer refuses it ("purely
    quantized models"); the converted directory loads like any other model, for policy and reference alike.
    """
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a safetensors model directory (once): {target}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # the gguf reader raises ValueError, KeyError, struct.error... on a bad file
        raise DpolabError(
            f"{gguf_path}: could not be read as a GGUF model ({type(error).__name__}: {error})."
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)  # atomic: an interrupted conversion leaves no half-written cache entry
    return target


def load_tokenizer(model_path: str, *, revision: str = "main", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise DpolabError(f"No usable tokenizer in {model_path}: {error}") from None


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(model: str) -> str | None:
    """The base model a LoRA adapter directory was trained on, or None when `model` is not an adapter."""
    config = Path(model) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def pad_token_id(tokenizer) -> int:
    """The id TRL pads batches with: the tokenizer's pad token, else its EOS token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def torch_dtype(name: str | None):
    """A `dtype` field's value (float32, bfloat16, float16, auto or None) as what `from_pretrained` takes."""
    import torch

    return "auto" if name in (None, "auto") else getattr(torch, name)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_scoring_model(path: str, dtype: str | None, trust_remote_code: bool = False, attn_implementation=None):
    """A model (or base + LoRA adapter) in eval mode on the GPU if there is one, with TRL's fused LM head, so it
    scores log-probs exactly as the trainer does."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from dpolab import packing

    kwargs = dict(
        dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
    )
    packing.register_attention(attn_implementation)
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), **kwargs)
        add_fused_lm_head(base)  # before wrapping, as TRL does
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        add_fused_lm_head(model)
    return model.to(device()).eval()


def load_generation_model(path: str, dtype: str | None = "auto"):
    """A causal LM (a LoRA adapter directory loads with its base) for `generate`, in eval mode."""
    from transformers import AutoModelForCausalLM

    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=torch_dtype(dtype))
        return PeftModel.from_pretrained(base, path).to(device()).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device()).eval()


def check_same_tokenizer(policy_tokenizer, ref_tokenizer, policy_path: str, ref_path: str) -> None:
    """Margins compare token-level log-probs, so policy and reference must tokenize identically."""
    if policy_tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise DpolabError(
            f"The policy ({policy_path}) and reference ({ref_path}) tokenizers differ "
            f"({len(policy_tokenizer)} vs {len(ref_tokenizer)} tokens): log-prob margins between them mean nothing. "
            f"Give the base model the policy was trained from as --ref."
        )


def check_same_architecture(policy_path: str, ref_path: str) -> None:
    """A reference of another architecture gives numbers, but they are not DPO's implicit rewards."""
    from transformers import AutoConfig

    policy, ref = AutoConfig.from_pretrained(policy_path), AutoConfig.from_pretrained(ref_path)

    def shape(config):
        return config.model_type, getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)

    if shape(policy) != shape(ref):
        raise DpolabError(
            f"The reference ({ref_path}: {ref.model_type}, hidden {getattr(ref, 'hidden_size', '?')}, "
            f"{getattr(ref, 'num_hidden_layers', '?')} layers) is not the architecture of the policy ({policy_path}: "
            f"{policy.model_type}, hidden {getattr(policy, 'hidden_size', '?')}, "
            f"{getattr(policy, 'num_hidden_layers', '?')} layers). Give the base model the policy was trained from."
        )


@contextlib.contextmanager
def score_completion_tokens_only():
    """Run TRL's fused LM head on completion positions only, on the CPU too.

    TRL 1.16 compacts to the positions it scores only on Triton devices (elsewhere every position, prompt and
    padding included, goes through the vocabulary projection and is then zeroed); on the CPU that projection
    dominates small models with large vocabularies. The log-probs are the same (bench/RESULTS.md). This is the
    one patch of a private TRL function (`trl.trainer.utils._use_triton`); tests/test_train.py pins it.
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


# --- reference log-probs, computed once and kept on disk (shared by train's pre-pass, eval and sweep) --------------


def model_fingerprint(path: str) -> str:
    """Identifies a model's weights without hashing them: the path and each weight file's size and mtime."""
    directory = Path(path)
    if not directory.is_dir():
        return path  # a Hub id: its revision is fixed by the cache
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([str(directory.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def token_ids_digest(batches) -> str:
    """A digest of the pairs' token ids; `batches` yields {prompt_ids, chosen_ids, rejected_ids: [ids per pair]}."""
    from array import array

    digest = hashlib.sha256()
    for batch in batches:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for ids in batch[key]:
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(array("q", ids).tobytes())
    return digest.hexdigest()


def reference_cache_path(ref_path: str, ids_digest: str, *, max_length, truncation_mode, dtype, bf16, fp16,
                         ld_alpha) -> Path:  # fmt: skip
    """Where the reference log-probs of these pairs live: keyed by everything they depend on (the reference
    weights, the token ids, truncation and precision), not by how they were batched."""
    parts = [model_fingerprint(ref_path), ids_digest, max_length, truncation_mode, str(dtype), bool(bf16), bool(fp16),
             ld_alpha]  # fmt: skip
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return cache_dir() / "ref_logps" / f"{key}.json"


def read_reference_cache(path: Path) -> dict | None:
    """{chosen, rejected, chosen_tokens, rejected_tokens, chosen_unweighted: [one per pair]} or None."""
    if not path.is_file():
        return None
    print(f"Reference log-probs from cache: {path}", flush=True)
    return json.loads(path.read_text())


def write_reference_cache(path: Path, logps: dict) -> None:
    from dpolab.rundir import write_atomic

    write_atomic(path, json.dumps(logps))
