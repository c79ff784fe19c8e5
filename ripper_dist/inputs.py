"""Turn command-line inputs into a sorted, de-duplicated list of audio files with unique track names.

Accepts files, folders (recursive), globs and list files (`.txt` one path per line, `.csv` with a `path` column or a
single column, `.parquet` with a `path`/`input_path` column). Relative paths in a list file are relative to the list.
"""
from __future__ import annotations

import csv
import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".opus", ".w64", ".caf"}
LIST_EXTENSIONS = {".txt", ".csv", ".parquet"}


@dataclass(frozen=True)
class TrackInput:
    path: Path
    track: str  # output folder name, unique within a job


def _from_list(path: Path) -> list[Path]:
    base = path.parent
    if path.suffix == ".txt":
        items = [ln.strip() for ln in path.read_text().splitlines()]
        items = [i for i in items if i and not i.startswith("#")]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in ("path", "input_path", "file") if c in header), None)
        items = [r[col] for r in rows[1:]] if col is not None else [r[0] for r in rows]
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        col = next((c for c in ("path", "input_path", "file") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{path}: no 'path' or 'input_path' column (columns: {table.column_names})")
        items = [str(x) for x in table.column(col).to_pylist() if x]
    return [Path(i) if Path(i).is_absolute() else base / i for i in items]


def _check_readable(path: Path) -> None:
    import soundfile as sf
    try:
        sf.info(str(path))
    except Exception:  # noqa: BLE001 - libsndfile says little more than "unknown format"
        raise ValueError(f"input {path}: {path.suffix or 'this'} files are not readable here (readable: "
                         f"{' '.join(sorted(AUDIO_EXTENSIONS))}); convert it, e.g. ffmpeg -i {path.name} "
                         f"{path.stem}.flac") from None


def expand_inputs(specs: list[str]) -> list[Path]:
    """Every audio file named by `specs`. A missing path given directly is an error (a typo should fail in a second,
    before any model is loaded); a missing entry of a list file is kept, so it gets its own failed row."""
    out: list[Path] = []
    ignored: dict[str, int] = {}  # extensions of the files folders held that are not audio we read
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS:
                    out.append(f)
                elif f.is_file() and not f.name.startswith("."):
                    ext = f.suffix.lower() or "(no extension)"
                    ignored[ext] = ignored.get(ext, 0) + 1
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            for item in _from_list(p):
                out += expand_inputs([str(item)]) if item.is_dir() else [item]
        elif not p.exists() and any(ch in spec for ch in "*?["):
            out += [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
        elif not p.exists():
            raise FileNotFoundError(f"input {spec}: no such file or folder")
        else:
            if p.suffix.lower() not in AUDIO_EXTENSIONS:  # named on the command line: its header must read now
                _check_readable(p)
            out.append(p)
    if not out and ignored:
        found = ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items(), key=lambda kv: -kv[1]))
        raise ValueError(f"no supported audio in {', '.join(specs)}: found {found}; readable: "
                         f"{' '.join(sorted(AUDIO_EXTENSIONS))} (convert others, e.g. ffmpeg -i in.m4a out.flac)")
    seen, unique = set(), []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p.absolute())
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


def assign_tracks(paths: list[Path]) -> list[TrackInput]:
    """Track name = file name without extension; on a clash each clashing input gets a suffix from a hash of its
    full path, so names are stable across reruns whatever the order or the other inputs."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    result = []
    for p in paths:
        name = p.stem
        if stems[name] > 1:
            name = f"{name}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
        result.append(TrackInput(p, name))
    return result
