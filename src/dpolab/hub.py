"""Is the Hugging Face Hub (or the mirror HF_ENDPOINT names) reachable? Asked once, so an offline machine fails
in a second, not after retries."""

import functools
import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    """Where downloads go: HF_ENDPOINT (a mirror such as https://hf-mirror.com) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def can_connect(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host and port opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@functools.cache
def hub_reachable() -> bool:
    """False when offline mode is set or the endpoint does not resolve/connect within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return can_connect(endpoint())
