"""`OUT/metadata.parquet`: one row per (model, input), written as tracks finish, so a crash loses nothing that was done.

One file per output root: several models separating into one folder each keep their own rows (and their own stem
folders, `stem_sink.StemLayout`), so nothing of one model's is overwritten by another's.

Each finished track is first appended to a journal (`OUT/.ripper-dist/rows.jsonl`), then the rows are compacted into
`OUT/metadata.parquet` (written atomically). Appending is O(1) per track however large the archive; the compacted file
is what pandas/DuckDB users read. A rerun reads both to decide what to skip.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
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
    ("input_container", pa.string()),  # as decoded: wav, flac, ogg, m4a, mp4, matroska, webm, asf... (None: older rows)
    ("input_codec", pa.string()),      # FFmpeg's codec name for every backend: pcm_s16le, flac, mp3, aac, alac, opus...
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("elapsed_s", pa.float64()),
    ("realtime_x", pa.float64()),     # audio seconds per wall second
    ("node", pa.string()),
    ("worker", pa.string()),
    ("engine", pa.string()),          # local | ray
    ("backend", pa.string()),         # runtime that ran the graph: ort | openvino (cpu_backend)
    # what was asked, readable (the options_key above is their hash plus the model's identity)
    ("ripper_dist_version", pa.string()),
    ("checkpoint_sha256", pa.list_(pa.string())),  # one per (sub-)model of the bag
    ("parity_sdr_db", pa.float64()),  # the export's agreement with upstream torch (worst sub-model); None: unchecked
    ("precision", pa.string()),
    ("precision_sdr_db", pa.float64()),  # fp16/bf16 graphs' SDR against fp32, checked when made (worst); None: fp32
    ("device", pa.string()),
    ("shifts", pa.int32()),
    ("overlap", pa.float64()),
    ("segment_s", pa.float64()),
    ("num_overlap", pa.int32()),
    ("tta", pa.bool_()),              # RoFormer --tta (None: rows of earlier versions, which had no TTA)
    ("stems", pa.list_(pa.string())),
    ("two_stems", pa.string()),
    ("other_method", pa.string()),
    ("clip_mode", pa.string()),
    ("bitrate_kbps", pa.int32()),
    # what was written
    ("out_sample_rate", pa.int32()),
    ("out_channels", pa.int32()),
    ("stem_peak_dbfs", pa.map_(pa.string(), pa.float64())),  # before clipping: > 0 means the stem would clip
    ("stem_gain", pa.map_(pa.string(), pa.float64())),       # gain applied by --clip-mode rescale (1.0: none)
    # timings: separate_s = elapsed_s, the track's wall time (first span started -> stems published); compute_s =
    # summed model-run time of its spans (more than separate_s when spans ran in parallel); load_s = the job's model
    # export/loading on the driver before any track started (the same in every row of a run)
    ("separate_s", pa.float64()),
    ("compute_s", pa.float64()),
    ("load_s", pa.float64()),
])
MAP_COLUMNS = ("stem_paths", "stem_peak_dbfs", "stem_gain")


def row_key(row: dict) -> tuple[str, str]:
    """Rows are keyed by (model, input): two models on one input are two rows."""
    return (row.get("model") or "", row["input_path"])


def _seconds(value) -> float:
    """A row's timestamp as seconds (rows from the journal hold floats, rows from Parquet datetimes)."""
    if value is None:
        return 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def normalise_row(row: dict) -> dict:
    out = {f.name: row.get(f.name) for f in SCHEMA}
    for name in MAP_COLUMNS:
        if isinstance(out[name], dict):
            out[name] = list(out[name].items())
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
    common: dict = field(default_factory=dict)  # job-wide columns: version, checkpoints, options, load_s

    def base(self, input_path: str, track: str) -> dict:
        row = {"input_path": input_path, "track": track, "model": self.model, "format": self.fmt,
               "subtype": self.subtype, "options_key": self.options_key, "engine": self.engine} | self.common
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
        """A finished track. elapsed_s (= separate_s) is its wall span (first span started to stems published);
        extra: compute_s and the stem sink's `row_fields` (out rate, channels, peaks, gains)."""
        elapsed = max(finished - started, 1e-9)
        return self.base(input_path, track) | {
            "status": "done", "error": None, "duration_s": plan.duration_s, "sample_rate": plan.in_rate,
            "channels": plan.in_channels, "stem_paths": {s: str(Path(p).relative_to(self.out_dir)) for s, p in paths.items()},
            "input_sha256": plan.input_sha256, "input_container": getattr(plan, "container", None) or None,
            "input_codec": getattr(plan, "codec", None) or None, "started_at": started, "finished_at": finished, "elapsed_s": elapsed,
            "realtime_x": plan.duration_s / elapsed, "separate_s": elapsed, "node": node, "worker": worker} | extra


JOURNAL = ".ripper-dist/rows.jsonl"


class Manifest:
    """Rows of one output folder, keyed by (model, input path) (the last row written for a key wins).

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

    def _load(self) -> dict[tuple[str, str], dict]:
        rows: dict[tuple[str, str], dict] = {}
        if self.path.exists():
            for r in pq.read_table(self.path).to_pylist():
                rows[row_key(r)] = r
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
            rows[row_key(r)] = r
        for r in rows.values():
            for name in MAP_COLUMNS:
                if r.get(name) is not None and not isinstance(r[name], dict):
                    r[name] = dict(r[name])
        return rows

    @property
    def rows(self) -> dict[tuple[str, str], dict]:
        return self._rows

    def rows_of(self, model: str) -> list[dict]:
        return [r for (m, _), r in self._rows.items() if m == model]

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
        self._rows[row_key(row)] = row
        since = time.monotonic() - self._last_compact
        if since > max(self.compact_every_s, 50 * self._compact_cost):
            self.compact()

    def compact(self) -> None:
        """Rewrite metadata.parquet from all rows, then empty the journal (and drop row files of older versions)."""
        t0 = time.monotonic()
        rows = [self._rows[k] for k in sorted(self._rows)]
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
    def is_done(self, model: str, input_path: str, opts_key: str, size: int, mtime_ns: int, sha256=None) -> bool:
        """True when a previous run of `model` finished this input with the same options and its stems are all
        present.

        Size and mtime equal to the stored ones stand for an unchanged file; otherwise `sha256()` (a callable, so the
        hash is only computed when needed) must equal the stored input hash.
        """
        r = self._rows.get((model, input_path))
        if not r or r["status"] != "done" or r["options_key"] != opts_key:
            return False
        if not all((self.out_dir / p).is_file() for p in (r["stem_paths"] or {}).values()):
            return False
        if r["input_size"] == size and r["input_mtime_ns"] == mtime_ns:
            return True
        return sha256 is not None and r["input_sha256"] == sha256()
