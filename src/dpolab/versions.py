"""The tested package set and what is installed; provenance for run directories (and `dpolab doctor`)."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path

# Installed and tested together (pyproject.toml pins them; constraints.txt holds the whole tree).
TESTED_VERSIONS = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "trl": "1.16.0",
    "accelerate": "1.15.0",
    "datasets": "5.2.0",
    "peft": "0.21.2",
    "numpy": "2.4.6",
}


def installed_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for package in ("dpolab", *TESTED_VERSIONS):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def git_commit() -> str | None:
    """The dpolab checkout's commit when it runs from a git clone, else None."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
