from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ripper_dist.inputs import assign_tracks, expand_inputs


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_files_folders_globs_lists(tmp_path):
    a = _touch(tmp_path / "a" / "song.wav")
    b = _touch(tmp_path / "b" / "deep" / "song.flac")
    c = _touch(tmp_path / "c.mp3")
    _touch(tmp_path / "a" / "notes.pdf")
    (tmp_path / "list.txt").write_text(f"# comment\n{c}\nb/deep/song.flac\n")
    (tmp_path / "list.csv").write_text("path,other\nc.mp3,1\n")
    pq.write_table(pa.table({"input_path": [str(a)]}), tmp_path / "list.parquet")
    assert expand_inputs([str(tmp_path / "a")]) == [a.resolve()]
    assert expand_inputs([str(tmp_path / "**" / "*.flac")]) == [b.resolve()]
    assert expand_inputs([str(tmp_path / "list.txt")]) == [c.resolve(), b.resolve()]
    assert expand_inputs([str(tmp_path / "list.csv"), str(c)]) == [c.resolve()]
    assert expand_inputs([str(tmp_path / "list.parquet")]) == [a.resolve()]
    with pytest.raises(FileNotFoundError, match="nope.wav: no such file"):  # a typo on the command line
        expand_inputs([str(tmp_path / "nope.wav")])
    (tmp_path / "gone.txt").write_text("nope.wav\n")  # a vanished entry of a list: its own failed row later
    assert expand_inputs([str(tmp_path / "gone.txt")]) == [(tmp_path / "nope.wav").absolute()]


def test_unique_stable_track_names(tmp_path):
    a, b, c = tmp_path / "x" / "song.wav", tmp_path / "y" / "song.wav", tmp_path / "other.wav"
    names = {t.path: t.track for t in assign_tracks([a, b, c])}
    assert names[c] == "other"
    assert names[a] != names[b] and names[a].startswith("song-") and names[b].startswith("song-")
    again = {t.path: t.track for t in assign_tracks([b, c, a])}
    assert again == names


def test_unsupported_files_are_named_before_anything_runs(tmp_path):
    for name in ("a.xyz", "b.xyz", "notes.txt"):
        _touch(tmp_path / "album" / name)
    with pytest.raises(ValueError, match=r"no supported audio in .*album: found 2 \.xyz, 1 \.txt"):
        expand_inputs([str(tmp_path / "album")])
    with pytest.raises(ValueError, match=r"a\.xyz: \.xyz files are not readable"):
        expand_inputs([str(tmp_path / "album" / "a.xyz")])


def test_ffmpeg_formats_are_scanned(tmp_path):
    """A folder of m4a/video/wma/ac3/wv... files is audio now (FFmpeg reads them): found by the scan, and each one
    that turns out not to be readable is a failed row later, not a refusal of the whole folder."""
    names = ["a.m4a", "b.mp4", "c.mkv", "d.webm", "e.wma", "f.ac3", "g.wv", "h.MOV", "i.aac", "j.ape", "k.tta"]
    for name in names + ["notes.txt", "code.ts"]:
        _touch(tmp_path / "album" / name)
    assert [p.name for p in expand_inputs([str(tmp_path / "album")])] == names


def test_an_unlisted_extension_named_directly_is_read_if_ffmpeg_can(tmp_path):
    """A .bin holding WAV data (libsndfile) or an MP4 (FFmpeg): accepted when named on the command line."""
    import av
    import numpy as np
    import soundfile as sf
    sf.write(tmp_path / "pcm.bin", np.zeros((100, 1), np.float32), 8000, format="WAV")
    with av.open(str(tmp_path / "aac.bin"), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for pkt in [*s.encode(frame), *s.encode(None)]:
            out.mux(pkt)
    got = expand_inputs([str(tmp_path / "pcm.bin"), str(tmp_path / "aac.bin")])
    assert [p.name for p in got] == ["pcm.bin", "aac.bin"]


def test_lists_name_files_only(tmp_path):
    """An empty entry or a folder in a list is an error naming the list and line, never a scan of the list's folder;
    blank lines are nothing."""
    from ripper_dist.inputs import ListFileError
    song = _touch(tmp_path / "music" / "song.wav")
    _touch(tmp_path / "unlisted.wav")
    (tmp_path / "ok.csv").write_text(f"path,title\n\n{song},a\n,\n")  # a blank line and an all-empty row
    assert expand_inputs([str(tmp_path / "ok.csv")]) == [song.resolve()]
    (tmp_path / "gap.csv").write_text(f"path,title\n{song},a\n,b\n")
    with pytest.raises(ListFileError, match=r"gap.csv line 3: empty path"):
        expand_inputs([str(tmp_path / "gap.csv")])
    (tmp_path / "short.csv").write_text(f"title,path\na,{song}\nb\n")  # a row without the path column
    with pytest.raises(ListFileError, match=r"short.csv line 3: empty path"):
        expand_inputs([str(tmp_path / "short.csv")])
    (tmp_path / "dir.txt").write_text("music\n")
    with pytest.raises(ListFileError, match=r"dir.txt line 1: music is a folder"):
        expand_inputs([str(tmp_path / "dir.txt")])
    pq.write_table(pa.table({"path": [str(song), ""]}), tmp_path / "l.parquet")
    with pytest.raises(ListFileError, match=r"l.parquet row 1: empty path"):
        expand_inputs([str(tmp_path / "l.parquet")])


def test_non_regular_inputs_are_refused_with_their_reason(tmp_path):
    import os
    fifo = tmp_path / "in" / "pipe.wav"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    song = _touch(tmp_path / "in" / "song.wav")
    tracks = {t.track: t for t in assign_tracks(expand_inputs([str(tmp_path / "in")]))}
    assert tracks["song"].error is None
    assert "is a FIFO, not a regular file" in tracks["pipe"].error
    (direct,) = assign_tracks(expand_inputs([str(fifo)]))  # named on the command line: the same row, never opened
    assert direct.error == tracks["pipe"].error
    (null,) = assign_tracks(expand_inputs(["/dev/null"]))
    assert "character device" in null.error
