"""Whether the Hugging Face hub can be reached, asked once and quickly.

Without this, a machine that cannot reach the hub spends 25 s in the libraries' retries before
a hub dataset fails, even when the local cache holds it. One TCP connection attempt (3 s at
most) decides; when it fails, hub loads run as under `HF_HUB_OFFLINE=1`: from the cache, or
at once with an error.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

CONNECT_TIMEOUT = 3.0


@functools.cache
def reachable() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Inside, the hub libraries work offline when the hub cannot be reached; yields whether
    it can."""
    import datasets.config
    from huggingface_hub import constants

    online = reachable()
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if not online:
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield online
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
