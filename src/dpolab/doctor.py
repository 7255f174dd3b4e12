"""`dpolab doctor`: is this the tested package set, can it train here, and what fixes each problem.

One table of checks; each problem comes with the command that fixes it; exit code 1 when any is an error.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dpolab.versions import TESTED_VERSIONS, installed_versions

OK, WARN, ERROR = "ok", "warn", "ERROR"
REINSTALL = "pip install -c constraints.txt -e .   (from the dpolab checkout)"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def python_check(version: str) -> Check:
    if version.startswith("3.11."):
        return Check("python", OK, version)
    return Check(
        "python", ERROR, f"{version}; dpolab is tested on 3.11", "python3.11 -m venv .venv && . .venv/bin/activate"
    )


def version_checks(installed: dict[str, str | None], tested: dict[str, str] = TESTED_VERSIONS) -> list[Check]:
    """Each package of the tested set: missing is an error, another version a warning with the pin to restore."""
    checks = []
    for package, wanted in tested.items():
        found = installed.get(package)
        if found is None:
            checks.append(Check(package, ERROR, f"not installed (tested: {wanted})", REINSTALL))
        elif found.split("+")[0] != wanted:
            checks.append(Check(package, WARN, f"{found}, tested with {wanted}", f"pip install {package}=={wanted}"))
        else:
            checks.append(Check(package, OK, found))
    return checks


def requirement_conflicts(requirements: dict[str, list[str]], installed: dict[str, str | None]) -> list[Check]:
    """Known-bad combinations, from the packages' own metadata: a declared requirement the installed version breaks."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    checks = []
    for package, declared in requirements.items():
        for text in declared:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            found = installed.get(requirement.name.lower())
            if found is None or not requirement.specifier:
                continue
            try:
                ok = requirement.specifier.contains(Version(found.split("+")[0]), prereleases=True)
            except InvalidVersion:
                continue
            if not ok:
                checks.append(Check(
                    f"{package} needs {requirement.name}", ERROR,
                    f"{package} requires {requirement.name}{requirement.specifier}, installed {found}",
                    f"pip install '{requirement.name}{requirement.specifier}'   or   {REINSTALL}",
                ))  # fmt: skip
    return checks


def numpy_abi_check() -> Check:
    """NumPy 2 with an extension compiled against NumPy 1 fails at import or at the torch/numpy boundary."""
    try:
        import numpy
        import torch

        torch.from_numpy(numpy.zeros(2))
        import pyarrow  # noqa: F401  (datasets' compiled core)
    except Exception as error:  # the ABI failure surfaces as ImportError, RuntimeError or AttributeError
        text = str(error)
        if "NumPy 1.x" in text or "numpy" in text.lower():
            return Check("numpy ABI", ERROR, text.splitlines()[0][:160], "pip install 'numpy<2'   or   " + REINSTALL)
        return Check("numpy ABI", ERROR, f"{type(error).__name__}: {text[:160]}", REINSTALL)
    return Check("numpy ABI", OK, f"numpy {numpy.__version__} works with torch and pyarrow")


def compile_check(cuda: bool, *, has_triton: bool, cxx: str | None) -> Check:
    """What `--torch_compile true` (inductor) needs here: Triton on a GPU, a C++ compiler on the CPU."""
    name = "torch_compile"
    if cuda:
        if has_triton:
            return Check(name, OK, "inductor can compile (Triton installed): the fast path compiles its layers")
        return Check(
            name,
            WARN,
            "Triton is missing: the fast path runs uncompiled (slower) and --torch_compile true would fail",
            "pip install triton",
        )
    if cxx:
        return Check(name, OK, f"inductor can compile for the CPU ({cxx})")
    return Check(name, WARN, "no C++ compiler (g++ or $CXX): --torch_compile true would fail on the CPU",
                 "apt-get install g++   (or leave torch_compile off)")  # fmt: skip


def torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", ERROR, "cannot import torch", "pip install torch==" + TESTED_VERSIONS["torch"])]
    build = f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"
    checks = [Check("torch build", OK, build)]
    if not torch.cuda.is_available():
        fix = "" if not torch.version.cuda else "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        detail = "no GPU: training runs on the CPU (fine for the demo and tests, slow for real models)"
        checks.append(Check("CUDA", WARN if torch.version.cuda else OK, detail, fix))
        checks.append(compile_check(False, has_triton=False, cxx=shutil.which(os.environ.get("CXX", "g++"))))
        return checks
    checks.append(compile_check(True, has_triton=importlib.util.find_spec("triton") is not None, cxx=None))
    properties = torch.cuda.get_device_properties(0)
    checks.append(Check("GPU", OK, f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", OK if bf16 else WARN, "supported" if bf16 else "not supported: use fp16 or fp32",
                        "" if bf16 else "set bf16: false (and fp16: true) in the config"))  # fmt: skip
    checks.append(fast_path_check(torch.cuda.get_device_capability(0)))
    return checks


def fast_path_check(capability: tuple[int, int]) -> Check:
    """The attention and compilation `dpolab train`'s fast path takes on a GPU of this compute capability."""
    from dpolab.train import older_gpu_reason

    reason = older_gpu_reason(capability)
    if reason is None:
        return Check("fast path", OK, f"compute capability {capability[0]}.{capability[1]}: FlexAttention and "
                     "compiled decoder layers, as measured on an H100")  # fmt: skip
    return Check("fast path", WARN, f"{reason}: SDPA with a dense mask, uncompiled (slower; the same numbers)")


# What the reference job writes to disk: Qwen2-0.5B-Instruct (~1 GB) and ultrafeedback_binarized (~0.2 GB) in the
# Hugging Face cache; a full run keeps 3 checkpoints of float32 weights + AdamW states (~5.5 GiB each), writes a 4th
# before it deletes the oldest, and final/ (train.disk_space_needed, which `dpolab train` checks for its own run).
DOWNLOAD_GIB = 1.2
FULL_RUN_GIB = 4 * 5.5 + 1.9
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
DEPRECATED_CACHE_VARIABLES = ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE")


def free_gib(path: Path) -> float:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free / 2**30


def cache_checks(environ=os.environ, runs_dir: Path = Path("runs")) -> list[Check]:
    """Where downloads and runs go, and whether the disk there holds the reference job."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cache_free = free_gib(cache)
    checks = [Check(
        "HF cache", OK if cache_free >= DOWNLOAD_GIB + 1 else WARN,
        f"{cache} ({cache_free:.0f} GiB free; the reference job downloads ~{DOWNLOAD_GIB:g} GiB)",
        "" if cache_free >= DOWNLOAD_GIB + 1 else "put the cache on the data disk: export HF_HOME=/root/autodl-tmp/hf",
    )]  # fmt: skip
    runs_free = free_gib(runs_dir.resolve())
    checks.append(Check(
        "disk for runs", OK if runs_free >= FULL_RUN_GIB else WARN,
        f"{runs_dir.resolve()} ({runs_free:.0f} GiB free; a full run's checkpoints take ~{FULL_RUN_GIB:.0f} GiB)",
        "" if runs_free >= FULL_RUN_GIB else "run from the data disk (cd /root/autodl-tmp) or set --runs_dir there, "
        "or lower save_total_limit",
    ))  # fmt: skip
    for name in DEPRECATED_CACHE_VARIABLES:
        if environ.get(name):
            checks.append(Check(
                name, WARN, f"set to {environ[name]}: deprecated, and the datasets cache does not follow it",
                f"unset {name}; export HF_HOME=<a directory on the data disk> instead",
            ))  # fmt: skip
    return checks


def network_checks(environ=os.environ) -> list[Check]:
    """The Hub or its mirror (HF_ENDPOINT), and proxy variables."""
    from dpolab.hub import DEFAULT_ENDPOINT, can_connect

    checks = []
    proxies = [name for name in PROXY_VARIABLES if environ.get(name)]
    if proxies:
        checks.append(Check(
            "proxy", WARN, f"{', '.join(proxies)} set: downloads go through {environ[proxies[0]]}",
            "keep it on for downloads only; training needs no network (AutoDL's academic proxy: unset http_proxy "
            "https_proxy once the model and data are cached)",
        ))  # fmt: skip
    if environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        checks.append(Check("Hugging Face Hub", OK, "offline mode (HF_HUB_OFFLINE=1): only cached models and data"))
        return checks
    endpoint = environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    label = "HF_ENDPOINT" if environ.get("HF_ENDPOINT") else "Hugging Face Hub"
    if can_connect(endpoint):
        checks.append(Check(label, OK, f"{endpoint} reachable"))
    else:
        fix = (
            "check the mirror's address (e.g. https://hf-mirror.com) or unset HF_ENDPOINT; behind a proxy, turn it on "
            "for the download"
            if environ.get("HF_ENDPOINT")
            else "set HF_ENDPOINT=https://hf-mirror.com where huggingface.co is blocked, or use local directories/files"
        )
        checks.append(Check(label, WARN, f"{endpoint} not reachable: Hub models and data must already be cached", fix))
    return checks


@dataclass
class DoctorConfig:
    """Check the installed versions against the tested set, the torch build, GPU and bf16, the numpy ABI, the
    Hugging Face cache and Hub access; each problem with the command that fixes it."""


def run(config: DoctorConfig) -> int:
    installed = {k: v for k, v in installed_versions().items() if k in TESTED_VERSIONS}
    requirements = {p: metadata.requires(p) or [] for p, v in installed.items() if v is not None}
    checks = [
        python_check(platform.python_version()),
        *version_checks(installed),
        *requirement_conflicts(requirements, {k.lower(): v for k, v in installed.items()}),
        *torch_checks(),
        numpy_abi_check(),
        *cache_checks(),
        *network_checks(),
    ]
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"  {check.status:<6}{check.name:<{width + 2}}{check.detail}")
        if check.fix:
            print(f"  {'':<6}{'':<{width + 2}}fix: {check.fix}")
    errors = sum(check.status == ERROR for check in checks)
    warnings = sum(check.status == WARN for check in checks)
    print(f"\n{errors} error(s), {warnings} warning(s).")
    return 1 if errors else 0
