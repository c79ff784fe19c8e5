"""`OUT/metadata.parquet`: one row per input, written as tracks finish, so a crash loses nothing that was done.

Each finished track is first appended to a journal (`OUT/.ripper-dist/rows.jsonl`), then the rows are compacted into
`OUT/metadata.parquet` (written atomically). Appending is O(1) per track however large the archive; the compacted file
is what pandas/DuckDB users read. A rerun reads both to decide what to skip.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

SCHEMA = pa.schema([
    ("input_path", pa.string()),
    ("track", pa.string()),
    ("status", pa.string()),          # done | failed
    ("error", pa.string()),
    ("model", pa.string()),
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int32()),
    ("stem_paths", pa.map_(pa.string(), pa.string())),  # stem -> path relative to OUT
    ("format", pa.string()),
    ("subtype", pa.string()),
    ("options_key", pa.string()),     # model identity + separation options: resume only skips on a match
    ("input_size", pa.int64()),
    ("input_mtime_ns", pa.int64()),
    ("input_sha256", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("elapsed_s", pa.float64()),
    ("realtime_x", pa.float64()),     # audio seconds per wall second
    ("node", pa.string()),
    ("worker", pa.string()),
    ("engine", pa.string()),          # local | ray
    ("backend", pa.string()),         # runtime that ran the graph: ort | openvino (cpu_backend)
])


def _seconds(value) -> float:
    """A row's timestamp as seconds (rows from the journal hold floats, rows from Parquet datetimes)."""
    if value is None:
        return 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def normalise_row(row: dict) -> dict:
    out = {f.name: row.get(f.name) for f in SCHEMA}
    if isinstance(out["stem_paths"], dict):
        out["stem_paths"] = list(out["stem_paths"].items())
    for ts in ("started_at", "finished_at"):
        if isinstance(out[ts], (int, float)):
            out[ts] = int(out[ts] * 1000)
    return out


def _atomic_write_table(table: pa.Table, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


@dataclass(frozen=True)
class RowContext:
    """What every row of a job shares (shipped to the workers that build the rows)."""

    out_dir: str
    model: str
    fmt: str
    subtype: str
    options_key: str
    engine: str

    def base(self, input_path: str, track: str) -> dict:
        row = {"input_path": input_path, "track": track, "model": self.model, "format": self.fmt,
               "subtype": self.subtype, "options_key": self.options_key, "engine": self.engine}
        try:
            st = os.stat(input_path)
            row["input_size"], row["input_mtime_ns"] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
        return row

    def failed(self, input_path: str, track: str, error: str, **extra) -> dict:
        return self.base(input_path, track) | {"status": "failed", "error": error, "stem_paths": {},
                                               "finished_at": time.time()} | extra

    def done(self, input_path: str, track: str, *, plan, paths: dict, started: float, finished: float,
             node: str, worker: str, **extra) -> dict:
        """A finished track. elapsed_s is its wall span (first span started to stems published)."""
        elapsed = max(finished - started, 1e-9)
        return self.base(input_path, track) | {
            "status": "done", "error": None, "duration_s": plan.duration_s, "sample_rate": plan.in_rate,
            "channels": plan.in_channels, "stem_paths": {s: str(Path(p).relative_to(self.out_dir)) for s, p in paths.items()},
            "input_sha256": plan.input_sha256, "started_at": started, "finished_at": finished, "elapsed_s": elapsed,
            "realtime_x": plan.duration_s / elapsed, "node": node, "worker": worker} | extra


JOURNAL = ".ripper-dist/rows.jsonl"


class Manifest:
    """Rows of one output folder, keyed by input path (the last row written for an input wins).

    A finished track is appended to a journal (one JSON line, flushed: a few microseconds, so recording stays a
    negligible share of the driver however many tracks arrive per second); `compact()` folds the journal into
    `metadata.parquet` (written atomically) and empties it. Compaction runs every `compact_every_s` at most, and never
    more than a small share of the time (it rewrites every row), and at the end of each job. A torn last line from a
    crash is ignored: that track is simply redone.
    """

    def __init__(self, out_dir: Path, compact_every_s: float = 10.0):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metadata.parquet"
        self.journal = self.out_dir / JOURNAL
        self.legacy_rows = self.out_dir / ".ripper-dist" / "rows"  # row files of earlier versions, still read
        self.compact_every_s = compact_every_s
        self._last_compact = time.monotonic()
        self._compact_cost = 0.0
        self._journal_file = None
        self._rows: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if self.path.exists():
            for r in pq.read_table(self.path).to_pylist():
                rows[r["input_path"]] = r
        pending = []
        if self.legacy_rows.is_dir():
            for f in self.legacy_rows.glob("*.parquet"):
                try:
                    pending += pq.read_table(f).to_pylist()
                except Exception:  # a torn row file from a crash: the track is simply redone
                    continue
        journal = []
        if self.journal.exists():
            for line in self.journal.read_text().splitlines():
                try:
                    journal.append(json.loads(line))
                except ValueError:  # a line torn by a crash
                    continue
        pending.sort(key=lambda r: _seconds(r.get("finished_at")))
        for r in pending + journal:  # the journal is in the order rows were recorded
            rows[r["input_path"]] = r
        for r in rows.values():
            if r.get("stem_paths") is not None and not isinstance(r["stem_paths"], dict):
                r["stem_paths"] = dict(r["stem_paths"])
        return rows

    @property
    def rows(self) -> dict[str, dict]:
        return self._rows

    def record(self, row: dict) -> None:
        """Persist one finished (done or failed) track immediately."""
        row = {k: row.get(k) for k in SCHEMA.names}
        row["stem_paths"] = dict(row["stem_paths"] or {})
        if self._journal_file is None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._journal_file = open(self.journal, "a", encoding="utf-8")
            if self._journal_file.tell() and not self.journal.read_bytes().endswith(b"\n"):
                self._journal_file.write("\n")  # end a line torn by a crash, so it does not swallow this row
        self._journal_file.write(json.dumps(row, default=str) + "\n")
        self._journal_file.flush()
        self._rows[row["input_path"]] = row
        since = time.monotonic() - self._last_compact
        if since > max(self.compact_every_s, 50 * self._compact_cost):
            self.compact()

    def compact(self) -> None:
        """Rewrite metadata.parquet from all rows, then empty the journal (and drop row files of older versions)."""
        t0 = time.monotonic()
        rows = sorted(self._rows.values(), key=lambda r: r["input_path"])
        table = pa.Table.from_pylist([normalise_row(r) for r in rows], schema=SCHEMA)
        _atomic_write_table(table, self.path)
        if self._journal_file is not None:
            self._journal_file.close()
            self._journal_file = None
        self.journal.unlink(missing_ok=True)
        if self.legacy_rows.is_dir():
            for f in self.legacy_rows.glob("*.parquet"):
                f.unlink(missing_ok=True)
        self._last_compact = time.monotonic()
        self._compact_cost = self._last_compact - t0
    def is_done(self, input_path: str, opts_key: str, size: int, mtime_ns: int, sha256=None) -> bool:
        """True when a previous run finished this input with the same options and its stems are all present.

        Size and mtime equal to the stored ones stand for an unchanged file; otherwise `sha256()` (a callable, so the
        hash is only computed when needed) must equal the stored input hash.
        """
        r = self._rows.get(input_path)
        if not r or r["status"] != "done" or r["options_key"] != opts_key:
            return False
        if not all((self.out_dir / p).is_file() for p in (r["stem_paths"] or {}).values()):
            return False
        if r["input_size"] == size and r["input_mtime_ns"] == mtime_ns:
            return True
        return sha256 is not None and r["input_sha256"] == sha256()
