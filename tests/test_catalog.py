"""The model catalogue (ripper_dist/catalog.json) and `-n NAME` for its RoFormers.

The shipped entries are checked as data (fields, configs parsed by the exporter's own parser, stems). Downloads run
against a local HTTP server (127.0.0.1 only) serving a small random checkpoint in the official format under a real
entry's file names, with a test catalogue whose entry states that file's size and sha256 (computed here)."""
import copy
import hashlib
import http.server
import json
import re
import threading
from functools import partial

import pandas as pd
import pytest

from ripper_dist import catalog, sources
from ripper_dist.cli import main
from ripper_dist.msst_chunking import output_stems
from ripper_export.roformer_config import guess_family, load_roformer_config, parse_roformer_config
from upstream import write_tone

KIM = "mel_band_roformer_kim_vocals"


def test_every_entry_is_complete_and_its_config_parses():
    entries = catalog.entries()
    fams = [e.family for e in entries.values()]
    assert [n for n, e in entries.items() if e.family == "htdemucs"] == ["htdemucs", "htdemucs_ft", "htdemucs_6s"]
    assert fams.count("mel_band_roformer") + fams.count("bs_roformer") >= 12
    assert fams.count("bs_roformer") >= 3 and fams.count("mel_band_roformer") >= 3
    by_file: dict[str, str] = {}
    for e in entries.values():
        for key in ("name", "family", "title", "stems", "licence", "scores", "listed_by"):
            assert key in e.raw, (e.name, key)
        assert e.stems and e.licence
        for s in e.raw["scores"]:
            assert s["values"] and s["source"], e.name
        for f in e.files + ([e.config_file] if e.config_file else []):
            assert f.url.startswith("https://") and f.url.endswith("/" + f.name), f.url
            assert by_file.setdefault(f.name, f.url) == f.url, f"{f.name}: one file name, two URLs (mirror by name)"
            if f.sha256 is not None:
                assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.source, e.name
        if not e.is_roformer:
            assert e.segment_s == 7.8 and all(f.sha256_prefix for f in e.files)
            continue
        cfg = parse_roformer_config(copy.deepcopy(e.config))  # the exporter's parser, no download
        assert guess_family(cfg.model) == e.family, e.name
        assert output_stems(cfg.instruments, cfg.target_instrument) == e.stems, e.name
        assert e.raw["config_source"] and e.config["audio"]["sample_rate"] == cfg.sample_rate == 44100
        assert e.problems() == [], (e.name, e.problems())  # every shipped RoFormer is exportable today
    assert catalog.lookup("MelBandRoformer.ckpt").name == KIM == catalog.lookup("kim").name
    assert sources.RELEASED["htdemucs"][0] == ["955717e8-8726e21a.th"] and sources.RELEASED_INFO["htdemucs"]["sdr_db"] == 8.8


def test_shipped_configs_build_the_export_model_spec():
    """The catalogue's hyperparameters are what the exporter builds (its spec: no weights, no download)."""
    from ripper_export.roformer import RoformerSpec
    for e in catalog.entries().values():
        if e.is_roformer:
            spec = RoformerSpec.from_kwargs(e.family, parse_roformer_config(copy.deepcopy(e.config)).model)
            assert spec.dim == e.config["model"]["dim"] and spec.stereo


class _Server:
    """A local HTTP server over a folder that remembers which paths were asked for."""

    def __init__(self, root):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a, **k):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """Kim's entry re-stated for a small random checkpoint served under Kim's file names; a test catalogue."""
    from ripper_export.random_roformer import make_roformer_checkpoint
    cfg_path, ckpt_path = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    www = tmp_path / "www"
    www.mkdir()
    real = catalog.lookup(KIM)
    ckpt_name, cfg_name = real.files[0].name, real.config_file.name
    (www / ckpt_name).write_bytes(ckpt_path.read_bytes())
    (www / cfg_name).write_text(cfg_path.read_text())
    server = _Server(www)
    raw = copy.deepcopy(real.raw)
    data = load_roformer_config(cfg_path).raw
    raw["config"] = {k: data[k] for k in ("audio", "model", "training", "inference")}
    raw["config"]["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["model"].items()}
    sha = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    raw["checkpoint"] |= {"url": server.url + "official/" + ckpt_name, "size": ckpt_path.stat().st_size,
                          "sha256": sha, "size_sha256_source": "this test"}
    raw["config_url"] = server.url + "official/" + cfg_name
    (www / "official").mkdir()
    for name in (ckpt_name, cfg_name):
        (www / "official" / name).write_bytes((www / name).read_bytes())
    pope = copy.deepcopy(raw) | {"name": "pope_roformer", "aliases": []}
    pope["config"]["model"]["use_pope"] = True
    test_catalog = tmp_path / "catalog.json"
    test_catalog.write_text(json.dumps({"models": [raw, pope]}))
    monkeypatch.setattr(catalog, "CATALOG_PATH", test_catalog)
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RIPPER_DIST_MODEL_URL", raising=False)
    yield server, www, raw, sha, test_catalog
    server.httpd.shutdown()


def _set(test_catalog, **changes):
    data = json.loads(test_catalog.read_text())
    data["models"][0]["checkpoint"] |= changes
    test_catalog.write_text(json.dumps(data))


def test_name_downloads_verifies_exports_and_the_row_has_the_sha256(served, tmp_path, monkeypatch):
    server, www, raw, sha, _ = served
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", server.url)  # a mirror: every file by its name
    track = write_tone(tmp_path / "in" / "song.wav", 0.8, seed=3)
    out = tmp_path / "out"
    assert main(["separate", "--engine", "local", "--no-progress", "-n", "kim", "-o", str(out), str(track)]) == 0
    assert sorted(server.requests) == sorted(["/" + raw["config_url"].rsplit("/", 1)[1],
                                               "/" + raw["checkpoint"]["url"].rsplit("/", 1)[1]])
    row = pd.read_parquet(out / "metadata.parquet").iloc[0]
    assert row.status == "done" and row.model == KIM and list(row.checkpoint_sha256) == [sha]
    assert sorted(dict(row.stem_paths)) == ["other", "vocals"]
    ckpt = tmp_path / "cache" / "checkpoints" / "MelBandRoformer.ckpt"
    assert sources.cached_sha256(ckpt) == sha
    assert json.loads((ckpt.parent / "MelBandRoformer.ckpt.verify.json").read_text())["checked"] == "sha256"
    server.requests.clear()  # the second run downloads nothing
    assert main(["separate", "--engine", "local", "--no-progress", "-n", KIM, "-o", str(out), "--force",
                 str(track)]) == 0
    assert server.requests == []


def test_official_urls_without_a_mirror_and_sha256_recorded_when_unstated(served):
    server, _, raw, sha, test_catalog = served
    _set(test_catalog, sha256=None, size=None)  # nothing stated: complete download, its sha256 recorded
    src = sources.fetch_roformer(KIM, progress=False)
    assert server.requests == ["/official/config_vocals_mel_band_roformer_kj.yaml", "/official/MelBandRoformer.ckpt"]
    assert sources.cached_sha256(src.checkpoint) == sha
    assert json.loads(src.checkpoint.with_name(src.checkpoint.name + ".verify.json").read_text())["checked"] == "length"


@pytest.mark.parametrize("stated,message", [({}, "checksum mismatch"), ({"sha256": None}, "size mismatch")])
def test_corrupted_download_refused_in_one_line_nothing_cached(served, tmp_path, monkeypatch, capsys, stated,
                                                               message):
    server, www, raw, sha, test_catalog = served
    _set(test_catalog, **stated)
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", server.url)
    good = (www / "MelBandRoformer.ckpt").read_bytes()
    (www / "MelBandRoformer.ckpt").write_bytes(good[:-100] + bytes(reversed(good[-100:])) + (b"" if "sha256" not in
                                                                                              stated else b"x"))
    rc = main(["separate", "--engine", "local", "--no-progress", "-n", KIM, "-o", str(tmp_path / "out"),
               str(write_tone(tmp_path / "t.wav", 0.3))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache" / "checkpoints" / "MelBandRoformer.ckpt").exists()
    assert not [p for p in (tmp_path / "cache" / "checkpoints").iterdir() if "MelBandRoformer" in p.name]
    assert not (tmp_path / "out" / "metadata.parquet").exists()


def test_changed_upstream_config_refused_before_the_checkpoint(served, monkeypatch):
    server, www, *_ = served
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", server.url)
    cfg = www / "config_vocals_mel_band_roformer_kj.yaml"
    cfg.write_text(cfg.read_text().replace("depth: 1\n", "depth: 2\n", 1))
    with pytest.raises(sources.ModelSourceError, match=r"model.depth is 2, catalogue 1.*changed"):
        sources.fetch_roformer(KIM, progress=False)
    assert server.requests == ["/config_vocals_mel_band_roformer_kj.yaml"]  # not the checkpoint
    assert not any((www.parent / "cache" / "checkpoints").iterdir())


@pytest.mark.parametrize("args,message", [
    (["-n", "pope_roformer"], "not exportable yet (mel_band_roformer with use_pope=True"),
    (["-n", KIM, "--two-stems", "drums"], f"--two-stems: {KIM} has no drums (it has vocals, other)"),
    (["-n", KIM, "--shifts", "2"], "--shifts: Demucs options"),
])
def test_refused_before_any_download(served, tmp_path, monkeypatch, capsys, args, message):
    server, *_ = served
    monkeypatch.setenv("RIPPER_DIST_MODEL_URL", server.url)
    rc = main(["separate", "--no-progress", *args, "-o", str(tmp_path / "out"), str(write_tone(tmp_path / "t.wav", 0.3))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert server.requests == []


def test_models_lists_the_catalogue_and_json(served, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert KIM in out and "NOT EXPORTABLE YET: use_pope=True" in out and "licence: unstated" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [KIM, "pope_roformer"]
    assert rows[0]["exportable"] and not rows[1]["exportable"] and rows[0]["downloaded"] is False
