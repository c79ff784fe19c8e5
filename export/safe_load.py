"""Load Demucs `.th` checkpoints without executing anything from the file.

A Demucs `.th` file is a `torch.save` of ``{klass, args, kwargs, state, training_args}``. Upstream loads it with
`torch.load(weights_only=False)`, i.e. a full pickle load that runs whatever the file asks for. Here the file is read
by torch's restricted unpickler (`weights_only=True`) with a small allowlist:

- the model class references (`demucs.htdemucs.HTDemucs`, and the older `HDemucs`/`Demucs` so that those files get a
  clear "unsupported" error later rather than a misleading "unsafe" one). The unpickler is given an inert
  `_ClassRef` placeholder for each name, never the class itself, so a pickle that tries to *call* it is refused;
  the placeholder is swapped for the real class after loading;
- `fractions.Fraction` (the `segment` kwarg), rebuilt from two integers;
- what torch allows by default: tensors, storages, plain containers and scalars.

Anything else raises `UnsafeCheckpointError`, whose message names the offending global (e.g. ``posix.system``).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "KNOWN_MODEL_CLASSES",
    "load_demucs_package",
    "build_demucs_model",
    "sha256_file",
]

#: Fully qualified names of the model classes a Demucs package may reference.
KNOWN_MODEL_CLASSES = (
    "demucs.htdemucs.HTDemucs",
    "demucs.hdemucs.HDemucs",
    "demucs.demucs.Demucs",
)


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references something outside the allowlist; nothing from it was executed."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is safe to read but not something this project can use (quantized, unknown layout, ...)."""


class _ClassRef:
    """Inert stand-in handed to the unpickler for a model class reference. Calling it is refused."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"checkpoint tries to call the model class {self.name} while unpickling; refused", self.name)

    def __repr__(self):
        return f"<class reference {self.name}>"


_REFS = {name: _ClassRef(name) for name in KNOWN_MODEL_CLASSES}


def _resolve_class(name: str):
    module, _, attr = name.rpartition(".")
    mod = __import__(module, fromlist=[attr])
    return getattr(mod, attr)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_FUNC_RE = re.compile(r"unrecognized function (.+?)(?: which belongs|$)")


def _offending_global(msg: str) -> str | None:
    m = _GLOBAL_RE.search(msg)
    if m:
        return m.group(1)
    m = _FUNC_RE.search(msg)
    if m:
        return m.group(1).strip()
    return None


def load_demucs_package(path: str | os.PathLike) -> dict:
    """Read a Demucs `.th` file into ``{klass, args, kwargs, state, training_args}`` without running its code.

    `klass` is the real upstream class (looked up by name, never called here); `state` is returned as stored
    (usually fp16). Raises `UnsafeCheckpointError` for any global outside the allowlist (message names it),
    `UnsupportedCheckpointError` for a diffq-quantized state or a file that is not a Demucs package.
    """
    path = Path(path)
    allow: list[Any] = [(ref, name) for name, ref in _REFS.items()]
    allow.append(Fraction)
    try:
        with torch.serialization.safe_globals(allow):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"refusing to load {path}: {exc}", exc.global_name) from None
    except Exception as exc:  # torch raises pickle.UnpicklingError (and RuntimeError wrapping it in places)
        msg = str(exc)
        name = _offending_global(msg)
        if name is not None or "Weights only load failed" in msg or "Unsupported" in msg:
            first = msg.strip().splitlines()
            detail = next((line for line in first if "GLOBAL" in line or "unrecognized" in line
                           or "Unsupported" in line), first[0] if first else "")
            what = f"global {name}" if name else "content"
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it references the disallowed {what}; "
                f"only Demucs model class references, tensors, fractions.Fraction and plain containers are "
                f"allowed ({detail.strip()})", name) from None
        raise

    if not isinstance(package, dict) or not {"klass", "args", "kwargs", "state"} <= set(package):
        raise UnsupportedCheckpointError(
            f"{path} is not a Demucs package (expected a dict with klass/args/kwargs/state)")
    klass = package["klass"]
    if not isinstance(klass, _ClassRef):
        raise UnsupportedCheckpointError(f"{path}: 'klass' is not a known Demucs model class reference: {klass!r}")
    state = package["state"]
    if not isinstance(state, dict):
        raise UnsupportedCheckpointError(f"{path}: 'state' is not a dict")
    if state.get("__quantized"):
        raise UnsupportedCheckpointError(
            f"{path} holds a diffq-quantized state (__quantized); quantized Demucs checkpoints are not supported")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UnsupportedCheckpointError(f"{path}: non-tensor entries in state: {bad[:5]}")
    if not isinstance(package["args"], (tuple, list)) or not isinstance(package["kwargs"], dict):
        raise UnsupportedCheckpointError(f"{path}: 'args' must be a sequence and 'kwargs' a dict")
    out = dict(package)
    out["klass"] = _resolve_class(klass.name)
    out["args"] = tuple(package["args"])
    out["kwargs"] = dict(package["kwargs"])
    out.setdefault("training_args", None)
    return out


def build_demucs_model(package: dict) -> torch.nn.Module:
    """Instantiate the upstream model from a package (as returned by `load_demucs_package`).

    Mirrors `demucs.states.load_model(strict=False)`: kwargs unknown to the class are dropped with a warning.
    The state (fp16 or fp32) is loaded into float32 parameters; the model is returned in eval mode.
    """
    klass = package["klass"]
    if isinstance(klass, _ClassRef):
        klass = _resolve_class(klass.name)
    if f"{klass.__module__}.{klass.__qualname__}" not in KNOWN_MODEL_CLASSES:
        raise UnsupportedCheckpointError(f"unknown model class {klass!r}")
    args = tuple(package.get("args", ()))
    kwargs = dict(package.get("kwargs", {}))
    sig = inspect.signature(klass)
    for key in list(kwargs):
        if key not in sig.parameters:
            warnings.warn("Dropping inexistant parameter " + key)
            del kwargs[key]
    state = package["state"]
    if state.get("__quantized"):
        raise UnsupportedCheckpointError("diffq-quantized states (__quantized) are not supported")
    model = klass(*args, **kwargs)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.float().eval()
    return model
