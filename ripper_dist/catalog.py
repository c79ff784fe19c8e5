"""The model catalogue: models known by name (`-n NAME`), as data shipped in the package (`catalog.json`).

Each entry carries what is known without downloading it: family, stems, the official URLs, size and sha256 where a
source states them, published scores with their source, licence, and for a RoFormer the `audio:`, `model:`,
`training:` (instruments) and `inference:` values of its config. So `-n NAME` can be checked (stems, options the
exporter does not implement) before gigabytes are fetched, and a changed upstream config is noticed (its `model:`
must equal the catalogue's). Nothing here downloads (`sources.py` does) or imports torch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .family_registry import is_msst

#: The shipped catalogue. Tests point this at a catalogue of their own (small random checkpoints).
CATALOG_PATH = Path(__file__).with_name("catalog.json")


@dataclass(frozen=True)
class File:
    """One file of an entry: where it comes from and what it must be (None: not stated by any source)."""
    name: str
    url: str
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None  # Demucs: the first 8 hex digits, in the file's name
    source: str | None = None         # where size/sha256 come from


@dataclass(frozen=True)
class Entry:
    raw: dict

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def family(self) -> str:
        return self.raw["family"]

    @property
    def is_roformer(self) -> bool:
        """An MSST-style entry (one checkpoint with its YAML config), by its family (`family_registry`)."""
        return is_msst(self.family)

    @property
    def stems(self) -> list[str]:
        return list(self.raw["stems"])

    @property
    def title(self) -> str:
        return self.raw.get("title", "")

    @property
    def licence(self) -> str:
        return self.raw.get("licence") or "unstated"

    @property
    def aliases(self) -> list[str]:
        return list(self.raw.get("aliases") or [])

    @property
    def segment_s(self) -> float | None:
        """Demucs: the longest usable segment (s); RoFormer chunks by its config (None)."""
        return self.raw.get("segment_s")

    @property
    def weights(self) -> list[list[float]] | None:
        return self.raw.get("weights")

    @property
    def files(self) -> list[File]:
        """Demucs: the bag's checkpoints; RoFormer: the checkpoint (the config is `config_file`)."""
        if self.is_roformer:
            c = self.raw["checkpoint"]
            return [File(c["url"].rsplit("/", 1)[1], c["url"], c.get("size"), c.get("sha256"), None,
                         c.get("size_sha256_source"))]
        return [File(f, self.raw["root_url"] + f, None, None, f.split("-")[1].split(".")[0] if "-" in f else None,
                     "the file name (upstream's <sig>-<sha8>.th)") for f in self.raw["files"]]

    @property
    def config_file(self) -> File | None:
        """RoFormer: its YAML config (verified by content: its `model:` must equal `config["model"]`)."""
        url = self.raw.get("config_url")
        return File(url.rsplit("/", 1)[1], url) if url else None

    @property
    def config(self) -> dict | None:
        """RoFormer: the config's sections as the catalogue states them (a mapping `parse_roformer_config` reads)."""
        return self.raw.get("config")

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return sum(sizes) if sizes and None not in sizes else None

    def problems(self) -> list[str]:
        """Why the exporter cannot export this entry yet (empty: it can): unknown keys and unimplemented options of
        its config, by the exporter's own rules (ripper_export.roformer_config, torch-free)."""
        if not self.is_roformer:
            return []
        from ripper_export.roformer_config import unknown_keys, unsupported_options
        model = self.config["model"]
        out = [f"unknown key {k}" for k in unknown_keys(self.family, model)]
        return out + unsupported_options(model)

    def score(self) -> str:
        """The first published score, short, with its source's first word (for the listing)."""
        for s in self.raw.get("scores") or []:
            values = s.get("values") or {}
            if values:
                key, value = next(iter(values.items()))
                label = key.replace("_sdr_db", "").replace("sdr_db", "SDR").replace("_", " ")
                return f"{label} {value:.2f} dB ({s['source'].split()[0]})"
        return ""


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> dict[str, Entry]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out: dict[str, Entry] = {}
    for raw in data["models"]:
        if raw["name"] in out:
            raise ValueError(f"{path}: model {raw['name']!r} listed twice")
        out[raw["name"]] = Entry(raw)
    return out


def entries() -> dict[str, Entry]:
    """The catalogue by name, in its file's order (read once per file version)."""
    path = Path(CATALOG_PATH)
    return _load(str(path), path.stat().st_mtime_ns)


def lookup(name: str) -> Entry | None:
    """The entry called `name`, or having it as an alias (audio-separator's file names, e.g. `MelBandRoformer.ckpt`)."""
    all_ = entries()
    if name in all_:
        return all_[name]
    return next((e for e in all_.values() if name in e.aliases), None)


def names(family: str | None = None) -> list[str]:
    return [n for n, e in entries().items() if family is None or e.family == family]
