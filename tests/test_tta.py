"""`--tta` (RoFormer): MSST's test-time augmentation (`utils/model_utils.py: apply_tta`): the mix, its channels
swapped, its polarity inverted; each separated, transformed back and averaged. Done per chunk, so any span split
gives the same bits, and the result is the mean of three plain runs on the transformed inputs."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_dist.cli import main
from ripper_dist.families import MsstFamily
from ripper_dist.msst_chunking import demix
from upstream import write_tone


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))


def model(x):
    """A stand-in that mixes the channels, is not odd, and depends on the position: (B, C, T) -> (B, 1, C, T); each
    TTA pass gives something else."""
    t = np.arange(x.shape[-1], dtype=np.float32)
    y = np.tanh(2 * x + 0.7 * x[:, ::-1]) * (1 + 0.5 * np.sin(t / 7)) + 0.3 * x ** 2 + 0.01
    return y[:, None].astype(np.float32)


class ArrayReader:
    def __init__(self, mix):
        self.mix = mix

    def read(self, a, b):
        return self.mix[:, a:b]


def msst_family(tta: bool, chunk: int = 1000, channels: int = 2) -> MsstFamily:
    info = SimpleNamespace(sample_rate=44100, channels=channels, chunk_samples=chunk, raw={})
    bundle = SimpleNamespace(family="mel_band_roformer", info=info, name="m", num_overlap=4,
                             instruments=["vocals", "other"], target_instrument="vocals", explain=None)
    return MsstFamily(bundle, SimpleNamespace(shifts=0, overlap=None, segment=None, num_overlap=None, stems=None,
                                              two_stems=None, other_method=None, tta=tta))


def run(family, mix, span=None, batch_size=3):
    blocks = []
    family.run_span([model], ArrayReader(mix), mix.shape[-1], {}, span or (0, mix.shape[-1]), batch_size,
                    blocks.append)
    return np.concatenate(blocks, axis=-1)


@pytest.mark.parametrize("channels", [2, 1])
def test_tta_is_the_mean_of_three_demixes_and_span_independent(channels):
    mix = np.random.default_rng(channels).standard_normal((channels, 9001)).astype(np.float32) * 0.3
    family = msst_family(True, channels=channels)
    whole = run(family, mix)
    # MSST: demix the mix, the channel-swapped mix and the inverted mix, undo each transform, average
    a = demix(mix, model, 1000, 4)
    b = demix(np.ascontiguousarray(mix[::-1]), model, 1000, 4)[:, ::-1]
    c = -demix(-mix, model, 1000, 4)
    mean = (a + b + c) / 3
    np.testing.assert_allclose(whole[0], mean[0], atol=2e-6)
    np.testing.assert_allclose(whole[1], mix - mean[0], atol=2e-6)  # the complement of the averaged target
    assert np.abs(whole[0] - a[0]).max() > 1e-2  # the augmentation changed something
    # any span split, any batch size: the same bits as one span
    for cuts in ([4500], [1234, 5000, 8999], [1, 2]):
        bounds = [0, *cuts, mix.shape[-1]]
        pieces = [run(family, mix, (lo, hi), batch_size=2) for lo, hi in zip(bounds[:-1], bounds[1:])]
        assert np.array_equal(np.concatenate(pieces, axis=-1), whole)


def test_tta_is_part_of_the_resume_key_only_when_on():
    assert "tta" not in msst_family(False).resume_options()  # keys of runs without it are those of earlier versions
    assert msst_family(True).resume_options()["tta"] is True


def _roformer(tmp_path, chunk_size=None):
    from ripper_export.random_roformer import make_roformer_checkpoint
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small", chunk_size=chunk_size)
    return config, ckpt, ["-n", "mel_band_roformer", "--config", str(config), "--checkpoint", str(ckpt)]


def test_cli_tta_equals_the_mean_of_three_plain_runs_and_resumes(tmp_path, capsys):
    config, ckpt, model_args = _roformer(tmp_path)
    track = write_tone(tmp_path / "in" / "song.wav", 1.3, seed=4)
    mix = sf.read(track, dtype="float32", always_2d=True)[0]
    aug = tmp_path / "aug"
    aug.mkdir()
    sf.write(aug / "swapped.wav", mix[:, ::-1], 44100, subtype="FLOAT")
    sf.write(aug / "inverted.wav", -mix, 44100, subtype="FLOAT")
    sf.write(aug / "plain.wav", mix, 44100, subtype="FLOAT")
    common = ["--engine", "local", "--no-progress", *model_args, "--subtype", "FLOAT", "--clip-mode", "none"]
    assert main(["separate", *common, "-o", str(tmp_path / "plain"), str(aug)]) == 0
    assert main(["separate", *common, "-o", str(tmp_path / "tta"), "--tta", str(track)]) == 0

    def stem(out, track, name):
        return sf.read(out / ckpt.stem / track / f"{name}.wav", dtype="float32", always_2d=True)[0]

    for name in ["vocals", "other"]:
        runs = [stem(tmp_path / "plain", t, name) for t in ("plain", "swapped", "inverted")]
        # undo each transform and average (for `other`, mix - target, this is also mix - the averaged target)
        mean = (runs[0] + runs[1][:, ::-1] - runs[2]) / 3
        got = stem(tmp_path / "tta", "song", name)
        assert got.shape == mix.shape
        np.testing.assert_allclose(got, mean, atol=1e-5)
        assert np.abs(got - runs[0]).max() > 1e-3
    # the resume key: done without --tta -> redone with it; done with it -> skipped
    assert main(["separate", *common, "-o", str(tmp_path / "plain"), "--tta", str(aug / "plain.wav")]) == 0
    assert "1 done, 0 failed, 0 skipped" in capsys.readouterr().err
    assert main(["separate", *common, "-o", str(tmp_path / "plain"), "--tta", str(aug / "plain.wav")]) == 0
    assert "0 done, 0 failed, 1 skipped" in capsys.readouterr().err
    np.testing.assert_allclose(stem(tmp_path / "plain", "plain", "vocals"), stem(tmp_path / "tta", "song", "vocals"),
                               atol=0)


def test_tta_refused_for_demucs_and_with_explain(tmp_path, capsys):
    track = write_tone(tmp_path / "in" / "song.wav", 0.5)
    assert main(["separate", "--no-progress", "-n", "htdemucs", "--tta", "-o", str(tmp_path / "o"), str(track)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tta" in err and "--shifts" in err and len(err.splitlines()) == 1
    config, ckpt, model_args = _roformer(tmp_path)
    assert main(["separate", "--no-progress", *model_args, "--tta", "--explain", "-o", str(tmp_path / "o"),
                 str(track)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tta" in err and "--explain" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_tta_ray_spans_equal_local_engine(tmp_path):
    """A track long enough to be cut into spans over two actors: --tta gives the local engine's bits."""
    config, ckpt, model_args = _roformer(tmp_path, chunk_size=64 * 320)  # 0.46 s chunks: fewer, cheaper calls
    inp = tmp_path / "in"
    write_tone(inp / "long.wav", 30.2, seed=3)  # two spans of >= 15 s
    write_tone(inp / "short.wav", 0.8, sr=48000, channels=1, seed=2)  # mono input, stereo model: 2 equal channels
    common = ["--no-progress", *model_args, "--tta", "--subtype", "FLOAT", "--clip-mode", "none", "--backend", "ort",
              "--threads", "1", str(inp)]  # one ORT thread per worker in both engines (2 shared cores in CI)
    assert main(["separate", "--engine", "local", "-o", str(tmp_path / "local"), *common]) == 0
    assert main(["separate", "--engine", "ray", "--num-cpus", "2", "-o", str(tmp_path / "ray"), *common]) == 0
    for track in ["long", "short"]:
        for name in ["vocals", "other"]:
            x = sf.read(tmp_path / "ray" / ckpt.stem / track / f"{name}.wav")[0]
            y = sf.read(tmp_path / "local" / ckpt.stem / track / f"{name}.wav")[0]
            assert x.shape == y.shape and np.array_equal(x, y), (track, name)
    rows = pd.read_parquet(tmp_path / "ray" / "metadata.parquet").set_index("track")
    assert len(rows.worker["long"].split(",")) == 2  # its spans ran on both actors


def test_tta_refused_by_a_demucs_family_and_not_passed_down_a_chain(tmp_path):
    """A Demucs graph given as .onnx is known as Demucs only when loaded: its family refuses --tta. A --then stage
    (a Demucs model) does not inherit the RoFormer stage's --tta."""
    from ripper_dist.engine import DemucsBag
    from ripper_dist.families import DemucsFamily, _Shape
    bag = DemucsBag([_Shape(1000)], None, 1000, ["vocals", "other"], name="tiny")
    opts = SimpleNamespace(stems=None, two_stems=None, other_method=None, shifts=0, seed=0, overlap=None,
                           num_overlap=None, segment=None, tta=True)
    with pytest.raises(ValueError, match="--tta.*tiny is a Demucs model: use --shifts"):
        DemucsFamily(bag, opts)
    config, ckpt, _ = _roformer(tmp_path)
    from ripper_dist.options import SeparateOptions
    first = SeparateOptions(model="mel_band_roformer", config=config, checkpoint=ckpt, tta=True,
                            then=(("other", "htdemucs"),))
    assert first.tta and not first.chained("other", "htdemucs").tta
