"""Is the Hugging Face Hub reachable? Asked once, so an offline machine fails in a second, not after retries."""

import functools
import os
import socket


@functools.cache
def hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co does not resolve/connect within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False
