"""The families and what `-n` names are decided in one place: every catalogue entry, alias and family name resolves
to its family through `model_ref.recognise`, and the family's own table (`family_registry`) says how it runs."""
from pathlib import Path

import pytest

from ripper_dist import catalog, sources
from ripper_dist.ensemble import member_options
from ripper_dist.family_registry import FAMILIES, config_families, is_msst, local_family
from ripper_dist.model_ref import CATALOGUE, CONFIG, LOCAL, ONNX, recognise, released_names
from ripper_dist.models import ModelBundle, ModelChoice, export_model
from ripper_dist.options import SeparateOptions


@pytest.mark.parametrize("name", list(catalog.entries()))
def test_every_catalogue_entry_resolves_to_its_family(name):
    entry = catalog.entries()[name]
    assert entry.family in FAMILIES
    for given in (name, *entry.aliases):
        ref = recognise(given)
        assert (ref.how, ref.family, ref.entry, ref.name) == (CATALOGUE, entry.family, entry, name)
        assert ref.msst == is_msst(entry.family) == entry.is_roformer
        assert ref.demucs == (not is_msst(entry.family))
    # the entry's schema is its family's: one checkpoint with its YAML config (MSST), or a bag of .th files
    assert ("checkpoint" in entry.raw and "config_url" in entry.raw) == is_msst(entry.family)
    assert ("files" in entry.raw) == (entry.family == local_family())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_name_resolves_through_the_registry(family):
    ref = recognise(family)
    if FAMILIES[family].by_config:  # -n FAMILY --config C.yaml --checkpoint M.ckpt
        assert (ref.how, ref.family, ref.msst) == (CONFIG, family, True)
        assert recognise(family, repo=Path("repo")).how == CONFIG  # --repo takes names out of the catalogue only
    else:  # a Demucs family's name is a released model (htdemucs) or a bag in --repo
        assert ref.how in (CATALOGUE, LOCAL) and ref.family == family and not ref.msst
    assert ModelBundle("m", family, [], None, []).is_msst == is_msst(family) == FAMILIES[family].msst


def test_graphs_local_models_and_unknown_names():
    assert recognise("a/model.onnx").how == ONNX and recognise("a/model.onnx").family is None
    assert recognise("htdemucs", onnx=Path("x.onnx")).how == ONNX  # --onnx: the graph carries its model
    ref = recognise("htdemucs", repo=Path("repo"))  # -n names a bag of the repo
    assert (ref.how, ref.family, ref.entry) == (LOCAL, local_family(), None)
    assert recognise("htdemucs_9s").how == LOCAL and recognise("htdemucs_9s").demucs
    assert sorted(released_names()) == sorted(sources.RELEASED)
    assert [f for f, i in FAMILIES.items() if i.local] == [local_family()]
    assert config_families() == ("mel_band_roformer", "bs_roformer")


def test_catalogue_roformer_brings_its_own_files():
    kim = "mel_band_roformer_kim_vocals"
    with pytest.raises(ValueError, match=f"-n: {kim} is a catalogue model: it brings its config and checkpoint "
                                         r"\(drop --checkpoint, or use -n mel_band_roformer with them\)"):
        recognise(kim).check_own_files(None, Path("x.ckpt"))
    recognise(kim).check_own_files(None, None)
    recognise("htdemucs").check_own_files(Path("c.yaml"), Path("x.th"))  # not a catalogue RoFormer: nothing to say
    # the export command meets the same refusal, before anything is downloaded
    with pytest.raises(ValueError, match="is a catalogue model"):
        export_model(ModelChoice(kim, config=Path("c.yaml")))


def test_ensemble_members_get_their_own_files(tmp_path):
    (tmp_path / "c.yaml").touch()
    (tmp_path / "m.ckpt").touch()
    opts = SeparateOptions(model="mel_band_roformer,htdemucs", config=tmp_path / "c.yaml",
                           checkpoint=tmp_path / "m.ckpt", precision="fp16", progress=False)
    roformer, demucs = (member_options(opts, m) for m in opts.members)
    assert roformer == ModelChoice("mel_band_roformer", checkpoint=tmp_path / "m.ckpt", config=tmp_path / "c.yaml",
                                   precision="fp16", progress=False)
    assert demucs == ModelChoice("htdemucs", precision="fp16", progress=False)


def test_options_ask_the_registry():
    refs = SeparateOptions(model="htdemucs,kim").model_refs  # an alias becomes its entry's name
    assert [(r.model, r.how) for r in refs] == [("htdemucs", CATALOGUE), ("mel_band_roformer_kim_vocals", CATALOGUE)]
    with pytest.raises(ValueError, match="--tta: .*htdemucs is a Demucs model"):
        SeparateOptions(model="htdemucs", tta=True)
    with pytest.raises(ValueError, match="-n: unknown model 'nope'; released models: htdemucs, htdemucs_ft, "
                                         "htdemucs_6s and the RoFormers"):
        SeparateOptions(model="nope").check_model_names()
    assert ModelChoice.of(SeparateOptions(model="htdemucs", precision="fp16")) == ModelChoice("htdemucs",
                                                                                              precision="fp16")
