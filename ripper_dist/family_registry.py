"""The model families by name: the one table that says which families exist and how each is run and named.

Graphs (`ripper.family`), the catalogue (`catalog.json`'s `family`) and `-n` name families by the names here. A new
family is one `FamilyInfo` line here (plus its `families.Family` subclass and its exporter); what a `-n` argument
names is decided from this table and the catalogue in `model_ref`. Imports nothing: the catalogue, the options and
the workers all read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    msst: bool       # chunked as MSST's demix (`families.MsstFamily`); else a Demucs bag (`families.DemucsFamily`)
    by_config: bool  # `-n NAME --config C.yaml --checkpoint M.ckpt`: the family's name with a user's own checkpoint
    local: bool      # what a bag in --repo or a lone --checkpoint is (Demucs: upstream's repo layout and .th files)


FAMILIES: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("htdemucs", msst=False, by_config=False, local=True),
    FamilyInfo("mel_band_roformer", msst=True, by_config=True, local=False),
    FamilyInfo("bs_roformer", msst=True, by_config=True, local=False),
)}


def is_msst(family: str) -> bool:
    """Whether graphs or catalogue entries of `family` are MSST-style (RoFormer: one checkpoint with its YAML config,
    chunked by MSST's demix); an unknown family is not."""
    info = FAMILIES.get(family)
    return info is not None and info.msst


def config_families() -> tuple[str, ...]:
    """The families `-n` names with --config and --checkpoint (mel_band_roformer, bs_roformer)."""
    return tuple(name for name, info in FAMILIES.items() if info.by_config)


def local_family() -> str:
    """The family of a model found in --repo or given as --checkpoint (htdemucs)."""
    return next(name for name, info in FAMILIES.items() if info.local)
