"""`dpolab doctor`: is this the tested package set, can it train here, and what fixes each problem.

One table of checks; each problem comes with the command that fixes it; exit code 1 when any is an error.
"""

from __future__ import annotations

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
        return checks
    properties = torch.cuda.get_device_properties(0)
    checks.append(Check("GPU", OK, f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", OK if bf16 else WARN, "supported" if bf16 else "not supported: use fp16 or fp32",
                        "" if bf16 else "set bf16: false (and fp16: true) in the config"))  # fmt: skip
    return checks


def cache_checks() -> list[Check]:
    from huggingface_hub import constants

    from dpolab.hub import hub_reachable

    cache = Path(constants.HF_HUB_CACHE)
    existing = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    free_gib = shutil.disk_usage(existing).free / 2**30
    checks = [Check("HF cache", OK if free_gib >= 10 else WARN, f"{cache} ({free_gib:.0f} GiB free)",
                    "" if free_gib >= 10 else "free disk or set HF_HOME to a larger disk")]  # fmt: skip
    if constants.HF_HUB_OFFLINE:
        checks.append(Check("Hugging Face Hub", OK, "offline mode (HF_HUB_OFFLINE=1): only cached models and data"))
    elif hub_reachable():
        checks.append(Check("Hugging Face Hub", OK, "reachable"))
    else:
        checks.append(Check(
            "Hugging Face Hub", WARN, "not reachable: Hub models and datasets must already be in the cache",
            "use local directories/files, or download where there is network and copy the cache",
        ))  # fmt: skip
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
