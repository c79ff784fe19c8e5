"""The YAML configs that (Mel-)Band RoFormer checkpoints ship with, read without running code.

MSST reads these files with PyYAML's `FullLoader`, and community configs use tags such as ``!!python/tuple``. Here a
`SafeLoader` subclass accepts the plain-data Python tags (tuple, list, dict, str, int, float, bool, none) and refuses
every other ``python/*`` tag (``python/object/apply:os.system``, ``python/name:...``, ``python/module:...``) with
`UnsafeConfigError`; nothing from the file is ever imported or called.

The result is a plain `RoformerConfig`: model kwargs (sequences as tuples), sample rate, chunk size
(``inference.chunk_size`` wins over ``audio.chunk_size``, as in MSST's `demix`), `num_overlap`, `batch_size`,
`instruments` and `target_instrument`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "UnsafeConfigError",
    "RoformerConfigError",
    "RoformerConfig",
    "SafeTupleLoader",
    "load_yaml",
    "parse_yaml",
    "load_roformer_config",
    "parse_roformer_config",
    "guess_family",
    "IGNORED_KEYS",
    "unknown_keys",
    "unsupported_options",
]

FAMILIES = ("mel_band_roformer", "bs_roformer")

# What `ripper_export.roformer` implements, stated here without torch so that the runtime (the model catalogue) can
# tell which configs export before anything is downloaded.
#: Keys that never change the inference function (training losses, kernels, checkpointing, dropouts).
IGNORED_KEYS = frozenset({
    "flash_attn", "sage_attention", "attn_dropout", "ff_dropout", "dim_freqs_in", "use_torch_checkpoint",
    "multi_stft_resolution_loss_weight", "multi_stft_resolutions_window_sizes", "multi_stft_hop_size",
    "multi_stft_normalized", "multi_stft_window_fn", "match_input_audio_length",
})
COMMON_KEYS = frozenset({
    "dim", "depth", "stereo", "num_stems", "time_transformer_depth", "freq_transformer_depth",
    "linear_transformer_depth", "dim_head", "heads", "stft_n_fft", "stft_hop_length", "stft_win_length",
    "stft_normalized", "stft_window_fn", "zero_dc", "mask_estimator_depth", "mlp_expansion_factor",
    "skip_connection", "use_pope",
})
FAMILY_KEYS = {"mel_band_roformer": frozenset({"num_bands", "sample_rate"}),
               "bs_roformer": frozenset({"freqs_per_bands"})}


def unknown_keys(family: str, model: dict) -> list[str]:
    """`model:` keys the exporter does not know for `family` (it refuses to guess their meaning)."""
    return sorted(set(model) - (COMMON_KEYS | FAMILY_KEYS[family] | IGNORED_KEYS))


def unsupported_options(model: dict) -> list[str]:
    """Known architecture switches set to values the exporter does not implement, as `key=value`."""
    out = []
    if int(model.get("linear_transformer_depth", 0) or 0) > 0:
        out.append(f"linear_transformer_depth={model['linear_transformer_depth']}")
    for key in ("skip_connection", "use_pope"):
        if model.get(key):
            out.append(f"{key}={model[key]}")
    if model.get("stft_window_fn") is not None:
        out.append("stft_window_fn (only the Hann window is supported)")
    return out


class UnsafeConfigError(ValueError):
    """The YAML asks for a Python object (``!!python/object...``, ``!!python/name...``); refused, nothing executed."""


class RoformerConfigError(ValueError):
    """The YAML is safe but not a usable RoFormer config (missing sections, inconsistent stems, ...)."""


_PY = "tag:yaml.org,2002:python/"


class SafeTupleLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` plus the harmless ``python/*`` data tags; every other ``python/*`` tag raises."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


def _construct_list(loader, node):
    return list(loader.construct_sequence(node, deep=True))


def _construct_dict(loader, node):
    return dict(loader.construct_mapping(node, deep=True))


def _scalar(kind):
    def construct(loader, node):
        value = loader.construct_scalar(node)
        if kind is bool:
            return loader.construct_yaml_bool(node)
        if kind is type(None):
            return None
        return kind(value)
    return construct


def _refuse(loader, tag_suffix, node):
    raise UnsafeConfigError(
        f"refusing YAML tag !!python/{tag_suffix} at line {node.start_mark.line + 1}: configs may only hold plain "
        f"data (python/tuple and the scalar/list/dict tags are accepted), never Python objects")


SafeTupleLoader.add_constructor(_PY + "tuple", _construct_tuple)
SafeTupleLoader.add_constructor(_PY + "list", _construct_list)
SafeTupleLoader.add_constructor(_PY + "dict", _construct_dict)
for _name, _kind in (("str", str), ("unicode", str), ("int", int), ("long", int), ("float", float),
                     ("bool", bool), ("none", type(None))):
    SafeTupleLoader.add_constructor(_PY + _name, _scalar(_kind))
# Exact constructors above win over this prefix (PyYAML looks exact tags up first).
SafeTupleLoader.add_multi_constructor(_PY, _refuse)


def parse_yaml(text: str | bytes) -> Any:
    """Parse YAML text with `SafeTupleLoader` (raises `UnsafeConfigError` for Python-object tags)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return yaml.load(text, Loader=SafeTupleLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        # Tags SafeLoader does not know (``!foo``): refused as well.
        raise UnsafeConfigError(f"refusing YAML: {exc}") from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Read and parse a YAML file with `SafeTupleLoader`."""
    return parse_yaml(Path(path).read_text(encoding="utf-8"))


def _tuplify(value):
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class RoformerConfig:
    """What an export and the MSST chunking need from a RoFormer YAML config."""
    model: dict                      # model kwargs as written in `model:` (sequences as tuples)
    sample_rate: int
    chunk_size: int                  # samples per chunk (inference.chunk_size, else audio.chunk_size)
    num_overlap: int
    batch_size: int
    instruments: tuple[str, ...]     # training.instruments
    target_instrument: str | None    # training.target_instrument (None when absent/empty)
    family: str | None = None        # guessed from the model keys (num_bands -> mel, freqs_per_bands -> bs)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return 2 if self.model.get("stereo", False) else 1

    @property
    def num_stems(self) -> int:
        return int(self.model.get("num_stems", 1))

    @property
    def sources(self) -> tuple[str, ...]:
        """Names of the stems the model outputs (MSST `prefer_target_instrument`)."""
        return (self.target_instrument,) if self.target_instrument else self.instruments


def guess_family(model: dict) -> str | None:
    if "freqs_per_bands" in model:
        return "bs_roformer"
    if "num_bands" in model:
        return "mel_band_roformer"
    return None


def parse_roformer_config(data: dict) -> RoformerConfig:
    """A parsed YAML mapping -> `RoformerConfig` (raises `RoformerConfigError` on inconsistencies)."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise RoformerConfigError("config has no `model:` mapping")
    audio = data.get("audio") or {}
    training = data.get("training") or {}
    inference = data.get("inference") or {}
    model = _tuplify(dict(data["model"]))

    if inference.get("chunk_size") is not None:
        chunk = inference["chunk_size"]
    elif audio.get("chunk_size") is not None:
        chunk = audio["chunk_size"]
    else:
        raise RoformerConfigError("config has neither inference.chunk_size nor audio.chunk_size")
    sample_rate = audio.get("sample_rate", model.get("sample_rate", 44100))
    num_overlap = inference.get("num_overlap", 4)
    batch_size = inference.get("batch_size", 1)
    instruments = tuple(str(x) for x in (training.get("instruments") or ()))
    target = training.get("target_instrument") or None
    num_stems = int(model.get("num_stems", 1))

    if int(chunk) <= 0 or int(num_overlap) <= 0 or int(batch_size) <= 0:
        raise RoformerConfigError(f"chunk_size {chunk}, num_overlap {num_overlap}, batch_size {batch_size} must be > 0")
    if target is not None:
        target = str(target)
        if num_stems != 1:
            raise RoformerConfigError(f"target_instrument {target!r} with num_stems={num_stems}: expected one stem")
        if instruments and target not in instruments:
            raise RoformerConfigError(f"target_instrument {target!r} is not in training.instruments {instruments}")
    elif len(instruments) != num_stems:
        raise RoformerConfigError(
            f"training.instruments {list(instruments)} has {len(instruments)} names but the model has "
            f"num_stems={num_stems} (and no target_instrument)")
    return RoformerConfig(model=model, sample_rate=int(sample_rate), chunk_size=int(chunk),
                          num_overlap=int(num_overlap), batch_size=int(batch_size), instruments=instruments,
                          target_instrument=target, family=guess_family(model), raw=data)


def load_roformer_config(path: str | os.PathLike) -> RoformerConfig:
    """Read a RoFormer YAML file safely (see module doc)."""
    return parse_roformer_config(load_yaml(Path(path)))
