import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from ripper_dist import sources


@pytest.fixture()
def http_dir(tmp_path):
    """A local HTTP server over a folder (never the network)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _named(root: Path, sig: str, payload: bytes) -> str:
    sha8 = hashlib.sha256(payload).hexdigest()[:8]
    name = f"{sig}-{sha8}.th"
    (root / name).write_bytes(payload)
    return name


def test_released_download_verified_and_cached(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    name = _named(root, "abcdef12", b"checkpoint bytes" * 1000)
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", url)
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.RELEASED, "tiny", ([name], None, None))
    src = sources.resolve_demucs("tiny", progress=False)
    assert src.members[0].path == tmp_path / "cache" / "checkpoints" / name
    assert src.members[0].path.read_bytes() == (root / name).read_bytes()
    (root / name).unlink()  # second resolve must not download again
    assert sources.resolve_demucs("tiny", progress=False).members[0].path.exists()


def test_corrupted_download_rejected(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    name = _named(root, "abcdef12", b"good bytes")
    (root / name).write_bytes(b"tampered bytes")
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", url)
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.RELEASED, "tiny", ([name], None, None))
    with pytest.raises(sources.ChecksumError, match="checksum mismatch"):
        sources.resolve_demucs("tiny", progress=False)
    ckpt_dir = tmp_path / "cache" / "checkpoints"
    assert not any(ckpt_dir.iterdir())  # nothing kept, not even the partial file


def test_official_table_matches_upstream_names():
    assert sources.OFFICIAL_ROOT_URL == "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/"
    assert sources.RELEASED["htdemucs"][0] == ["955717e8-8726e21a.th"]
    assert len(sources.RELEASED["htdemucs_ft"][0]) == 4
    assert sources.RELEASED["htdemucs_ft"][1][2] == [0.0, 0.0, 1.0, 0.0]


def test_repo_bag(tmp_path):
    a = _named(tmp_path, "aaaaaaaa", b"model a")
    (tmp_path / "bbbbbbbb.th").write_bytes(b"model b")  # no sha8: accepted unverified, like upstream
    (tmp_path / "mybag.yaml").write_text("models: ['aaaaaaaa', 'bbbbbbbb']\nweights: [[1, 0], [0, 1]]\nsegment: 4.5\n")
    src = sources.resolve_demucs("mybag", repo=tmp_path)
    assert [m.path.name for m in src.members] == [a, "bbbbbbbb.th"]
    assert src.weights == [[1.0, 0.0], [0.0, 1.0]] and src.segment == 4.5
    assert sources.resolve_demucs("aaaaaaaa", repo=tmp_path).members[0].path.name == a
    (tmp_path / a).write_bytes(b"corrupt")
    with pytest.raises(sources.ChecksumError):
        sources.resolve_demucs("mybag", repo=tmp_path)
    with pytest.raises(sources.ModelSourceError, match="not found"):
        sources.resolve_demucs("nothere", repo=tmp_path)


def test_checkpoint_file(tmp_path):
    p = tmp_path / "custom.th"
    p.write_bytes(b"x")
    assert sources.resolve_demucs(checkpoint=p).members[0].path == p
    with pytest.raises(sources.ModelSourceError, match="does not exist"):
        sources.resolve_demucs(checkpoint=tmp_path / "missing.th")
