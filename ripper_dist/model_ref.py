"""What a `-n` model argument names, decided in one place (the options, the export and ensembles all ask here).

A model argument is one of: an exported graph (`.onnx`: its metadata names its family), a catalogue entry by name or
alias (`catalog.json`; not with --repo, where `-n` names a bag of the repo), a family's own name with --config and
--checkpoint (`family_registry.config_families`), or else a local Demucs model (a bag or signature in --repo, a
--checkpoint; a name that is none of these is unknown). A new catalogue entry or family needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import catalog
from .family_registry import config_families, is_msst, local_family

ONNX = "onnx"            # an exported graph
CATALOGUE = "catalogue"  # a model known by name: downloaded, verified, exported
CONFIG = "config"        # a family name with the user's --config and --checkpoint
LOCAL = "local"          # a Demucs bag or signature in --repo, a --checkpoint, or an unknown name


@dataclass(frozen=True)
class ModelRef:
    model: str                        # as given to -n
    how: str                          # ONNX, CATALOGUE, CONFIG or LOCAL
    family: str | None                # None for an exported graph: known when its metadata is read
    entry: catalog.Entry | None = None

    @property
    def name(self) -> str:
        """The catalogue's name for an alias (`MelBandRoformer.ckpt` -> its entry's name), else the argument."""
        return self.entry.name if self.entry is not None else self.model

    @property
    def msst(self) -> bool:
        """Known before loading to be an MSST-style model (RoFormer): a catalogue one, or a family with --config."""
        return self.family is not None and is_msst(self.family)

    @property
    def demucs(self) -> bool:
        """Known before loading to be a Demucs model (an exported graph is known only when loaded)."""
        return self.how != ONNX and not self.msst

    def check_own_files(self, config, checkpoint) -> None:
        """A catalogue RoFormer brings its config and checkpoint: a --config/--checkpoint given too is refused."""
        given = [o for o, v in (("--config", config), ("--checkpoint", checkpoint)) if v is not None]
        if self.how == CATALOGUE and self.msst and given:
            raise ValueError(f"-n: {self.model} is a catalogue model: it brings its config and checkpoint (drop "
                             f"{', '.join(given)}, or use -n {self.family} with them)")


def recognise(model: str, *, repo: Path | None = None, onnx: Path | None = None) -> ModelRef:
    """What `-n model` names, given --repo and --onnx (which take the name out of the catalogue)."""
    model = str(model)
    if onnx is not None or Path(model).suffix == ".onnx":
        return ModelRef(model, ONNX, None)
    entry = catalog.lookup(model) if repo is None else None
    if entry is not None:
        return ModelRef(model, CATALOGUE, entry.family, entry)
    if model in config_families():
        return ModelRef(model, CONFIG, model)
    return ModelRef(model, LOCAL, local_family())


def released_names() -> list[str]:
    """The Demucs models of the catalogue (the names `-n` downloads as upstream's releases)."""
    return [n for n, e in catalog.entries().items() if e.family == local_family()]
