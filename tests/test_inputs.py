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
    for name in ("a.m4a", "b.m4a", "notes.txt"):
        _touch(tmp_path / "album" / name)
    with pytest.raises(ValueError, match=r"no supported audio in .*album: found 2 \.m4a, 1 \.txt"):
        expand_inputs([str(tmp_path / "album")])
    with pytest.raises(ValueError, match=r"a\.m4a: \.m4a files are not readable"):
        expand_inputs([str(tmp_path / "album" / "a.m4a")])


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
