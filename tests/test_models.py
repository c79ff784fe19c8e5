"""Local models (`--repo`, `--checkpoint`, RoFormer `--config`) refuse stem and segment options they cannot honour
before anything is exported: the options are checked against what the checkpoint's kwargs (read with the safe
loader) or the config say, exit 2 in a second instead of after a half-minute export."""
import pytest

import ripper_dist.export_cache as export_cache
import ripper_dist.models as models
from ripper_dist.cli import main
from ripper_dist.sources import from_repo
from ripper_export.random_demucs import make_bag_repo, make_htdemucs_checkpoint
from ripper_export.random_roformer import make_roformer_checkpoint
from upstream import write_tone


class _Exported(Exception):
    """Raised instead of exporting: the check let the options through to the export."""


@pytest.fixture
def no_export(monkeypatch, tmp_path):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))

    def refuse(*a, **k):
        raise _Exported()

    monkeypatch.setattr(models, "export_demucs_source", refuse)
    monkeypatch.setattr(export_cache, "export_roformer", refuse)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    make_bag_repo(d, "bag", n_models=2, size="small", sources=["drums", "bass", "other", "vocals"], segment=1.0)
    # the small size trains on 1.2 s: the bag's 1.0 s applies (upstream BagOfModels rule)
    make_htdemucs_checkpoint(d / "six.th", size="small", sources=6)
    return d


def _run(tmp_path, *args):
    track = write_tone(tmp_path / "in" / "song.wav", 0.5, seed=1)
    return main(["separate", str(track), "-o", str(tmp_path / "out"), "--engine", "local", *args])


@pytest.mark.parametrize("args,message", [
    (["--two-stems", "guitar"], "--two-stems: bag has no guitar (it has drums, bass, other, vocals)"),
    (["--stems", "vocals,piano"], "--stems: bag has no piano"),
    (["--segment", "1.1"], "--segment: 1.1 s is longer than bag's 1 s"),  # the bag YAML's segment rules
])
def test_repo_model_refused_before_export(tmp_path, repo, no_export, capsys, args, message):
    assert _run(tmp_path, "--repo", str(repo), "-n", "bag", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache" / "onnx").exists()


def test_checkpoint_model_checked_with_its_own_sources(tmp_path, repo, no_export, capsys):
    six = repo / "six.th"
    with pytest.raises(_Exported):  # guitar exists in a 6-source model: on to the export
        _run(tmp_path, "--checkpoint", str(six), "--two-stems", "guitar")
    assert _run(tmp_path, "--checkpoint", str(six), "--stems", "flute") == 2
    assert "--stems: six has no flute" in capsys.readouterr().err


def test_valid_options_reach_the_export(tmp_path, repo, no_export):
    with pytest.raises(_Exported):
        _run(tmp_path, "--repo", str(repo), "-n", "bag", "--two-stems", "vocals", "--segment", "1.0")


def test_shape_read_from_the_checkpoints(repo):
    sources, segment = export_cache.demucs_shape(from_repo(repo, "bag"))
    assert sources == ["drums", "bass", "other", "vocals"] and segment == pytest.approx(1.0)


def test_roformer_config_stems_refused_before_export(tmp_path, no_export, capsys):
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small", num_stems=1,
                                            target_instrument="vocals")
    base = ["-n", "mel_band_roformer", "--config", str(config), "--checkpoint", str(ckpt)]
    assert _run(tmp_path, *base, "--two-stems", "drums") == 2
    err = capsys.readouterr().err
    assert "--two-stems:" in err and "has no drums" in err and "vocals" in err, err
    with pytest.raises(_Exported):
        _run(tmp_path, *base, "--stems", "vocals")


def test_the_check_is_given_the_checkpoints_shape(repo, no_export):
    """`export_model` hands the caller's check what the checkpoint states; the export command passes none."""
    seen = []
    with pytest.raises(_Exported):
        models.export_model(models.ModelChoice("bag", repo=repo), check=lambda *shape: seen.append(shape))
    assert seen == [("bag", ["drums", "bass", "other", "vocals"], pytest.approx(1.0))]
    with pytest.raises(_Exported):
        models.export_model(models.ModelChoice("bag", repo=repo))
