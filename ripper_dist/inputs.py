"""Turn command-line inputs into a sorted, de-duplicated list of audio files with unique track names.

Accepts files, folders (recursive), globs and list files (`.txt` one path per line, `.csv` with a `path` column or a
single column, `.parquet` with a `path`/`input_path` column). Relative paths in a list file are relative to the list.
A list names files: an empty entry or a folder in it is an error naming the list and line (never a folder scan).
Inputs that cannot be read as files (FIFOs, devices, unreadable files or folders) are kept with the reason, so each
gets its own failed row without anything opening it (a FIFO would block its reader).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: read by libsndfile
SNDFILE_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".opus", ".w64", ".caf"}
#: read by FFmpeg (`ffmpeg_decode`): audio containers and raw streams, and video files (their first audio stream).
#: Not `.ts` (TypeScript sources are commoner than MPEG transport streams in a folder); name such a file directly.
FFMPEG_EXTENSIONS = {".m4a", ".m4b", ".m4r", ".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".mka", ".webm",
                     ".wma", ".wmv", ".asf", ".aac", ".adts", ".ac3", ".eac3", ".ec3", ".dts", ".thd", ".mlp",
                     ".wv", ".ape", ".tta", ".tak", ".mpc", ".mp2", ".mpa", ".mp1", ".spx", ".amr", ".au", ".snd",
                     ".aifc", ".rf64", ".dsf", ".dff", ".ra", ".rm", ".avi", ".flv", ".mpg", ".mpeg", ".vob",
                     ".m2ts", ".mts", ".ogv", ".voc", ".gsm"}
AUDIO_EXTENSIONS = SNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS
LIST_EXTENSIONS = {".txt", ".csv", ".parquet"}


@dataclass(frozen=True)
class TrackInput:
    path: Path
    track: str  # output folder name, unique within a job
    error: str | None = None  # refused at listing (not a regular file, unreadable): a failed row, never opened


def input_problem(path: Path) -> str | None:
    """Why `path` cannot be an input, from its metadata alone (None: go ahead; a missing file fails when read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}: {path}"
    if stat.S_ISDIR(st.st_mode):
        return f"NotAFileError: {path} is a folder that cannot be listed (permission denied)" \
            if not os.access(path, os.R_OK | os.X_OK) else f"NotAFileError: {path} is a folder"
    if not stat.S_ISREG(st.st_mode):
        kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "character device" if stat.S_ISCHR(st.st_mode)
                else "block device" if stat.S_ISBLK(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "special file")
        return f"NotAFileError: {path} is a {kind}, not a regular file"
    if not os.access(path, os.R_OK):
        return f"PermissionError: permission denied: {path}"
    return None


class ListFileError(ValueError):
    """A list file entry that names no file (empty, or a folder): the list's to fix, before any work starts."""


def _entry(base: Path, listfile: Path, where: str, value) -> Path:
    text = "" if value is None else str(value).strip()
    if not text:
        raise ListFileError(f"{listfile} {where}: empty path (a list names files; remove the entry)")
    p = Path(text) if Path(text).is_absolute() else base / text
    if p.is_dir():
        raise ListFileError(f"{listfile} {where}: {text} is a folder (a list names files; give the folder itself "
                            "as an input to separate everything in it)")
    return p


def _from_list(path: Path) -> list[Path]:
    base = path.parent
    if path.suffix == ".txt":
        return [_entry(base, path, f"line {n}", ln) for n, ln in enumerate(path.read_text().splitlines(), 1)
                if ln.strip() and not ln.strip().startswith("#")]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]  # blank lines: none
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0][1]]
        col = next((header.index(c) for c in ("path", "input_path", "file") if c in header), None)
        body = rows[1:] if col is not None else rows
        col = col or 0
        return [_entry(base, path, f"line {n}", r[col] if col < len(r) else "") for n, r in body]
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    col = next((c for c in ("path", "input_path", "file") if c in table.column_names), None)
    if col is None:
        raise ListFileError(f"{path}: no 'path' or 'input_path' column (columns: {table.column_names})")
    return [_entry(base, path, f"row {n}", x) for n, x in enumerate(table.column(col).to_pylist())]


def _walk(folder: Path, ignored: dict[str, int] | None = None) -> list[Path]:
    """Audio files under `folder` (symlinked folders are not followed); a folder that cannot be listed is returned
    itself, so it gets a failed row instead of vanishing. ignored: counts the extensions of the other files."""
    out, unreadable = [], []
    for root, dirs, files in os.walk(folder, onerror=lambda e: unreadable.append(Path(e.filename))):
        dirs.sort()
        for name in files:
            f = Path(root) / name
            if f.suffix.lower() in AUDIO_EXTENSIONS and (f.is_file() or input_problem(f) is not None):
                out.append(f)
            elif ignored is not None and not name.startswith("."):
                ext = f.suffix.lower() or "(no extension)"
                ignored[ext] = ignored.get(ext, 0) + 1
    return sorted(out) + unreadable


def _check_readable(path: Path) -> None:
    """A file with an extension we do not scan for, named on the command line: read now if libsndfile or FFmpeg
    (an audio stream) can read it, else a one-line error before any model is loaded."""
    import soundfile as sf
    try:
        sf.info(str(path))
        return
    except Exception:  # noqa: BLE001 - libsndfile says little more than "unknown format"; FFmpeg may read it
        pass
    try:
        import av
        with av.open(str(path)) as c:
            if c.streams.audio:
                return
    except Exception:  # noqa: BLE001 - av.FFmpegError: not a media file
        pass
    raise ValueError(f"input {path}: {path.suffix or 'this'} files are not readable here (neither libsndfile nor "
                     f"FFmpeg finds audio in it); convert it, e.g. ffmpeg -i {path.name} {path.stem}.flac") from None


def expand_inputs(specs: list[str]) -> list[Path]:
    """Every audio file named by `specs`. A missing path given directly is an error (a typo should fail in a second,
    before any model is loaded); a missing entry of a list file is kept, so it gets its own failed row."""
    out: list[Path] = []
    ignored: dict[str, int] = {}  # extensions of the files folders held that are not audio we read
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += _walk(p, ignored)
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            out += _from_list(p)
        elif not p.exists() and any(ch in spec for ch in "*?["):
            out += [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
        elif not p.exists():
            raise FileNotFoundError(f"input {spec}: no such file or folder")
        else:
            if p.is_file() and p.suffix.lower() not in AUDIO_EXTENSIONS:  # named on the command line: read it now
                _check_readable(p)
            out.append(p)
    if not out and ignored:
        found = ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items(), key=lambda kv: -kv[1]))
        raise ValueError(f"no supported audio in {', '.join(specs)}: found {found}; readable: "
                         f"{' '.join(sorted(AUDIO_EXTENSIONS))} (name another file directly to try it)")
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
        result.append(TrackInput(p, name, input_problem(p)))
    return result
