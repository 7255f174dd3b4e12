"""Models: a Hub id, a local directory, or a .gguf file (converted once into a safetensors directory).

`resolve_model` finds where a model lives without loading its weights, so a missing model fails before
any data is read; training and evaluation then load from the directory it returns.
"""

from __future__ import annotations

import hashlib
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
