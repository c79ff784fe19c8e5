"""Content hashes: files (inputs, checkpoints, cached graphs) and option sets (resume keys), each computed one way."""
from __future__ import annotations

import hashlib
import json
import os


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def options_key(options: dict) -> str:
    """A short stable key of a JSON-able option set (sorted keys, so the order options were given in is irrelevant)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]
