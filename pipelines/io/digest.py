"""Digests of JSON-able values: the one way every stage and the runner fingerprint settings."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def sha256_json(value: Any, length: int | None = None) -> str:
    """SHA-256 hex digest of the canonical JSON of ``value`` (sorted keys, no spaces).

    Values JSON cannot encode are written with ``str``. ``length`` keeps that many leading hex
    digits (for names and short keys); ``None`` keeps all 64.
    """
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
