import duckdb
import pandas as pd

from ripper_dist.manifest import Manifest


def _row(path, status="done", stems=None, **kw):
    base = dict(input_path=path, track="t", status=status, error=None if status == "done" else "boom",
                model="m", duration_s=1.5, sample_rate=44100, channels=2, stem_paths=stems or {},
                options_key="k", input_size=10, input_mtime_ns=5, input_sha256="abc", finished_at=1.0)
    base.update(kw)
    return base


def test_rows_survive_without_compaction_and_compact(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vocals.wav").write_bytes(b"x")
    m = Manifest(tmp_path, compact_every_s=1e9)
    m.record(_row("/a.wav", stems={"vocals": "t/vocals.wav"}))
    m.record(_row("/b.wav", status="failed"))
    # a "crash" here: a new process still sees both rows
    m2 = Manifest(tmp_path)
    assert set(m2.rows) == {("m", "/a.wav"), ("m", "/b.wav")}
    assert m2.is_done("m", "/a.wav", "k", 10, 5)
    assert not m2.is_done("m", "/b.wav", "k", 10, 5)            # failed: redo
    assert not m2.is_done("m", "/a.wav", "other", 10, 5)        # other options: redo
    assert m2.is_done("m", "/a.wav", "k", 11, 6, sha256=lambda: "abc")   # touched but same content
    assert not m2.is_done("m", "/a.wav", "k", 11, 6, sha256=lambda: "def")
    (tmp_path / "t" / "vocals.wav").unlink()
    assert not m2.is_done("m", "/a.wav", "k", 10, 5)            # stem missing: redo
    m2.compact()
    assert not (tmp_path / ".ripper-dist" / "rows.jsonl").exists()
    df = pd.read_parquet(tmp_path / "metadata.parquet")
    assert list(df.input_path) == ["/a.wav", "/b.wav"]
    assert dict(df.stem_paths[0]) == {"vocals": "t/vocals.wav"}
    con = duckdb.connect()
    got = con.execute(f"select status, stem_paths['vocals'] from '{tmp_path / 'metadata.parquet'}' order by input_path").fetchall()
    assert got[0][0] == "done" and "t/vocals.wav" in str(got[0][1])


def test_a_torn_journal_line_is_ignored_and_compaction_is_not_every_row(tmp_path):
    m = Manifest(tmp_path, compact_every_s=1e9)
    for i in range(50):
        m.record(_row(f"/{i}.wav", status="failed"))
    assert not (tmp_path / "metadata.parquet").exists()  # 50 rows, no rewrite of the table yet
    with open(tmp_path / ".ripper-dist" / "rows.jsonl", "a") as f:
        f.write('{"input_path": "/torn.wav", "sta')  # the process died mid-line
    again = Manifest(tmp_path)
    assert len(again.rows) == 50 and ("m", "/torn.wav") not in again.rows
    again.record(_row("/0.wav"))  # a later row for the same input wins
    assert Manifest(tmp_path).rows[("m", "/0.wav")]["status"] == "done"


def test_two_models_on_one_input_keep_their_own_rows(tmp_path):
    m = Manifest(tmp_path)
    m.record(_row("/a.wav", model="htdemucs", stem_peak_dbfs={"vocals": -3.5}, stem_gain={"vocals": 1.0}))
    m.record(_row("/a.wav", model="kim", status="failed"))
    m.compact()
    again = Manifest(tmp_path)
    assert [r["status"] for r in again.rows_of("htdemucs")] == ["done"]
    assert [r["status"] for r in again.rows_of("kim")] == ["failed"]
    assert not again.is_done("kim", "/a.wav", "k", 10, 5)
    df = pd.read_parquet(tmp_path / "metadata.parquet")
    assert sorted(df.model) == ["htdemucs", "kim"]
    assert dict(df[df.model == "htdemucs"].stem_peak_dbfs.iloc[0]) == {"vocals": -3.5}
