"""Every RoFormer of the model catalogue exports: its architecture at test size, through `-n NAME`'s own path.

Per entry, `small_config` of its config (same architecture: bands, STFT, stems, mask estimator, switches; small dim,
depth, heads and chunk) and a random checkpoint (a raw state dict, as the community files are) are served from a
local folder under the entry's own file names (a `$RIPPER_DIST_MODEL_URL` mirror, file:// URLs), with a test
catalogue stating the shrunk config and the files' sha256. `-n NAME` then downloads, verifies, checks the config
against the catalogue and exports with the parity check against bs-roformer 0.3.10; the graph is then checked
against the reference on a music-like chunk (a noise floor under the tones: REFERENCE.md section 2, Conditioning).
An entry the exporter cannot export must be marked so by the catalogue and refused by `-n NAME`, before any download.
Released shapes: `python jobs/bench.py catalog --names ...`.
"""
import copy
import json
import re
import zlib
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ripper_dist import catalog
from ripper_dist.family_registry import is_msst
from ripper_dist.models import ModelChoice, export_model
from ripper_dist.msst_chunking import output_stems
from ripper_dist.onnx_model import GraphInfo
from ripper_dist.sources import ModelSourceError
from ripper_export.fp16 import music_like
from ripper_export.metrics import sdr_db
from ripper_export.random_roformer import SMALL_DEPTH, SMALL_HOPS, SMALL_SIZES, small_config, \
    write_roformer_checkpoint
from ripper_export.roformer import RoformerSpec, band_bins, build_roformer, read_checkpoint
from ripper_export.roformer_config import load_roformer_config
from ripper_export.roformer_export import REFERENCE_NAME, build_reference
from ripper_export.safe_load import sha256_file

import bs_roformer  # noqa: E402,F401  (the reference: part of the test extra)

ROFORMERS = [n for n, e in catalog.entries().items() if is_msst(e.family)]
#: Not in the shipped catalogue: ZFTurbo's 4-stem BS-RoFormer with `skip_connection: true` (an option the exporter
#: does not implement), so that the refusal branch below runs whatever the shipped entries are.
UNEXPORTABLE = "test_bs_roformer_skip_connection"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The shrunk files of every catalogue RoFormer in one folder (a mirror by file name) and a test catalogue."""
    root = tmp_path_factory.mktemp("catalog-export")
    www, models = root / "www", []
    for name in ROFORMERS:
        entry = catalog.entries()[name]
        raw = copy.deepcopy(entry.raw)
        if entry.problems():  # refused before any download: no files (nor could its model be built)
            models.append(raw)
            continue
        raw["config"] = small_config(entry.config)
        cfg_name, ckpt_name = entry.config_file.name, entry.files[0].name
        before = (www / cfg_name).read_text() if (www / cfg_name).exists() else None
        _, ckpt = write_roformer_checkpoint(www, entry.family, raw["config"], seed=zlib.crc32(name.encode()) % 10_000,
                                            config_name=cfg_name, checkpoint_name=ckpt_name)
        assert before in (None, (www / cfg_name).read_text()), f"{cfg_name}: one file name, two configs"
        raw["checkpoint"] |= {"size": ckpt.stat().st_size, "sha256": sha256_file(ckpt), "size_sha256_source": "test"}
        models.append(raw)
    bad = copy.deepcopy(catalog.entries()["model_bs_roformer_ep_17_sdr_9.6568"].raw)
    bad |= {"name": UNEXPORTABLE, "aliases": [], "config_url": f"https://example.invalid/{UNEXPORTABLE}.yaml"}
    bad["checkpoint"] = {"url": f"https://example.invalid/{UNEXPORTABLE}.ckpt"}
    bad["config"]["model"]["skip_connection"] = True
    models.append(bad)
    test_catalog = root / "catalog.json"
    test_catalog.write_text(json.dumps({"models": models}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small gain nothing from threads, and lose much when the cores are busy
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(catalog, "CATALOG_PATH", test_catalog)
            mp.setenv("RIPPER_DIST_CACHE", str(root / "cache"))
            mp.setenv("RIPPER_DIST_MODEL_URL", www.as_uri())
            yield SimpleNamespace(root=root, www=www)
    finally:
        torch.set_num_threads(threads)


def test_small_config_keeps_the_architecture():
    """Only the cost-only sizes change; the band structure (every band's bins) is the released one."""
    shrunk = {"dim", "depth", "heads", "dim_head"}
    for name in ROFORMERS:
        entry = catalog.entries()[name]
        before = copy.deepcopy(entry.config)
        small = small_config(entry.config)
        assert entry.config == before, name  # a copy: the catalogue's own mapping is untouched
        model, released = small["model"], entry.config["model"]
        assert {k: v for k, v in model.items() if k not in shrunk} == \
               {k: v for k, v in released.items() if k not in shrunk}, name
        assert model["depth"] == min(released["depth"], SMALL_DEPTH) and model["dim"] == SMALL_SIZES["dim"]
        for section in ("training", "inference"):
            assert small[section] == entry.config[section], name
        hop, chunk = released["stft_hop_length"], entry.config["audio"]["chunk_size"]
        assert small["audio"]["chunk_size"] == SMALL_HOPS * hop + chunk % hop > released["stft_n_fft"] // 2
        assert {k: v for k, v in small["audio"].items() if k != "chunk_size"} == \
               {k: v for k, v in entry.config["audio"].items() if k != "chunk_size"}
        if entry.problems():  # not buildable (refused by `-n NAME`, see below)
            continue
        bins = [b.tolist() for b in band_bins(RoformerSpec.from_kwargs(entry.family, model))]
        assert bins == [b.tolist() for b in band_bins(RoformerSpec.from_kwargs(entry.family, released))], name


@pytest.mark.parametrize("name", [*ROFORMERS, UNEXPORTABLE])
def test_every_catalogue_roformer_exports(mirror, name):
    entry = catalog.lookup(name)
    opts = ModelChoice(name, progress=False)
    if name == UNEXPORTABLE:
        assert entry.problems() == ["skip_connection=True"]
    if entry.problems():  # stated by the catalogue: `-n NAME` must refuse it, naming why, before any download
        with pytest.raises(ModelSourceError, match=rf"-n {re.escape(name)}: not exportable yet .*"
                                                   rf"{re.escape(entry.problems()[0])}.*nothing downloaded"):
            export_model(opts)
        cache = mirror.root / "cache" / "checkpoints"
        assert not any((cache / f.name).exists() for f in (*entry.files, entry.config_file))
        return

    exported = export_model(opts)  # `-n NAME`: download (verified), config checked against the catalogue, export
    (graph,) = exported.onnx_paths
    assert exported.name == name and exported.family == entry.family
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    info = GraphInfo.from_metadata(meta)
    model = entry.config["model"]
    assert float(meta["ripper.parity_sdr_db"]) >= 60 and meta["ripper.parity_reference"] == REFERENCE_NAME
    assert meta["ripper.checkpoint_sha256"] == entry.files[0].sha256
    assert info.family == entry.family and info.channels == (2 if model["stereo"] else 1)
    assert json.loads(meta["ripper.stft"]) == {"n_fft": model["stft_n_fft"], "hop_length": model["stft_hop_length"],
                                               "win_length": model["stft_win_length"],
                                               "normalized": model["stft_normalized"]}
    training = entry.config["training"]
    assert json.loads(meta["ripper.instruments"]) == training["instruments"]
    assert output_stems(json.loads(meta["ripper.instruments"]), meta["ripper.target_instrument"] or None) \
        == entry.stems
    assert len(info.sources) == model["num_stems"]
    assert meta["ripper.num_overlap"] == str(entry.config["inference"]["num_overlap"])

    cfg = load_roformer_config(mirror.www / entry.config_file.name)
    assert info.chunk_samples == cfg.chunk_size <= (SMALL_HOPS + 1) * model["stft_hop_length"]
    mix = music_like(2, info.channels, info.chunk_samples, seed=zlib.crc32(name.encode()) % 1000).astype(np.float32)
    got = sess.run(["stems"], {"mix": mix})[0]
    state = build_roformer(entry.family, cfg.model, read_checkpoint(mirror.www / entry.files[0].name)).state_dict()
    with torch.no_grad():
        ref = build_reference(entry.family, cfg.model, state)(torch.from_numpy(mix)).numpy()
    assert got.shape == ref.shape == (2, model["num_stems"], info.channels, info.chunk_samples)
    for s in range(model["num_stems"]):
        assert sdr_db(ref[:, s], got[:, s]) >= 60, (name, s)
