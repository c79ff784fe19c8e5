"""RoFormer model definitions, checkpoint loading and config parsing (torch side)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from ripper_export.random_roformer import (  # noqa: E402
    SMALL_CHUNK, WRAPS, make_config, make_roformer_checkpoint, random_state_dict,
)
from ripper_export.roformer import (  # noqa: E402
    Roformer, RoformerKeyError, RoformerSpec, build_roformer, load_roformer_state, mel_band_membership,
    read_checkpoint,
)
from ripper_export.roformer_config import (  # noqa: E402
    RoformerConfigError, UnsafeConfigError, load_roformer_config, parse_roformer_config, parse_yaml,
)
from ripper_export.roformer_export import build_reference, sdr_db  # noqa: E402
from ripper_export.safe_load import UnsafeCheckpointError  # noqa: E402

pytest.importorskip("bs_roformer")


def _small(family, num_stems=1, stereo=True, **overrides):
    cfg = make_config(family, "small", num_stems=num_stems, stereo=stereo, model_overrides=overrides)
    return cfg["model"]


def _mix(channels, length=SMALL_CHUNK, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, channels, length, generator=g)


@pytest.mark.parametrize("family", ["mel_band_roformer", "bs_roformer"])
@pytest.mark.parametrize("stereo", [False, True])
@pytest.mark.parametrize("num_stems", [1, 2])
def test_matches_reference(family, stereo, num_stems):
    kwargs = _small(family, num_stems, stereo)
    state = random_state_dict(family, kwargs, seed=num_stems + 2 * stereo)
    ours = build_roformer(family, kwargs, state)
    ref = build_reference(family, kwargs, state)
    x = _mix(2 if stereo else 1)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, num_stems, 2 if stereo else 1, SMALL_CHUNK)
    assert sdr_db(b.numpy(), a.numpy()) >= 60


@pytest.mark.parametrize("family", ["mel_band_roformer", "bs_roformer"])
@pytest.mark.parametrize("depth", [1, 3])
def test_mask_estimator_depth(family, depth):
    kwargs = _small(family, mask_estimator_depth=depth)
    state = random_state_dict(family, kwargs, seed=depth)
    linears = {k for k in state if k.startswith("mask_estimators.0.to_freqs.0.0.") and k.endswith(".weight")}
    assert len(linears) == (depth + 1 if family == "mel_band_roformer" else depth)   # upstream's two meanings
    x = _mix(2)
    with torch.no_grad():
        a = build_roformer(family, kwargs, state)(x)
        b = build_reference(family, kwargs, state)(x)
    assert sdr_db(b.numpy(), a.numpy()) >= 60


@pytest.mark.parametrize("zero_dc", [None, True, False])
def test_zero_dc(zero_dc):
    kwargs = _small("mel_band_roformer")
    if zero_dc is not None:
        kwargs["zero_dc"] = zero_dc
    state = random_state_dict("mel_band_roformer", kwargs)
    model = build_roformer("mel_band_roformer", kwargs, state)
    assert model.spec.zero_dc == (zero_dc is not False)          # absent -> true (current MSST)
    x = _mix(2) + 0.5                                             # a DC offset the masks act on
    with torch.no_grad():
        out = model(x)
        ref = build_reference("mel_band_roformer", kwargs, state)(x)
    assert sdr_db(ref.numpy(), out.numpy()) >= 60
    # Kim's original / bs-roformer 0.3.10 without the patch: no DC zeroing.
    plain = build_reference("mel_band_roformer", dict(kwargs, zero_dc=False), state)(x)
    if zero_dc is False:
        assert sdr_db(plain.numpy(), out.numpy()) >= 60
    else:
        assert sdr_db(plain.numpy(), out.numpy()) < 40


def test_flash_attn_flag_is_ignored():
    kwargs = _small("bs_roformer")
    state = random_state_dict("bs_roformer", kwargs)
    x = _mix(2)
    with torch.no_grad():
        a = build_roformer("bs_roformer", dict(kwargs, flash_attn=True), state)(x)
        b = build_roformer("bs_roformer", dict(kwargs, flash_attn=False), state)(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_attention_equals_plain(groups):
    """Head groups (the time transformer's memory bound in the export) only change the order of the work."""
    from ripper_export.roformer import Attention, RotaryFreqs
    torch.manual_seed(0)
    rot = RotaryFreqs(16)
    plain, grouped = Attention(32, 4, 16, rot), Attention(32, 4, 16, rot, head_groups=groups)
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 50, 32)
    cos_q, sin_q = rot.tables(50, 16 ** -0.5)
    cos_k, sin_k = rot.tables(50)
    with torch.no_grad():
        a = plain(x, (cos_q, sin_q, cos_k, sin_k))
        b = grouped(x, (cos_q, sin_q, cos_k, sin_k))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_time_attention_runs_one_head_at_a_time():
    kwargs = _small("mel_band_roformer")
    model = build_roformer("mel_band_roformer", kwargs)
    time_tf, freq_tf = model.layers[0]
    assert time_tf.layers[0][0].head_groups == model.spec.heads and freq_tf.layers[0][0].head_groups == 1


def test_frozen_rotary_tables_match_dynamic():
    kwargs = _small("mel_band_roformer")
    model = build_roformer("mel_band_roformer", kwargs, random_state_dict("mel_band_roformer", kwargs))
    x = _mix(2)
    with torch.no_grad():
        a = model(x)
        model.freeze_length(SMALL_CHUNK)
        b = model(x)
        c = model(_mix(2, SMALL_CHUNK + 640))                   # another length: tables computed on the fly
    assert torch.equal(a, b) and c.shape[-1] == SMALL_CHUNK + 640


@pytest.mark.parametrize("sr,n_fft,bands", [(44100, 2048, 60), (44100, 256, 8), (48000, 2048, 60),
                                           (44100, 4096, 60), (44100, 2048, 40), (32000, 1024, 32)])
def test_mel_bands_match_librosa(sr, n_fft, bands):
    librosa = pytest.importorskip("librosa")
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=bands)
    fb[0, 0] = 1
    fb[-1, -1] = 1
    assert np.array_equal(fb > 0, mel_band_membership(sr, n_fft, bands))


def test_vocals_key_layout_and_size():
    kwargs = make_config("mel_band_roformer", "vocals")["model"]
    with torch.device("meta"):
        model = Roformer(RoformerSpec.from_kwargs("mel_band_roformer", kwargs))
    keys = list(model.state_dict())
    assert len(keys) == 684
    for key in ("band_split.to_features.59.0.gamma", "band_split.to_features.59.1.bias",
                "layers.5.1.layers.0.0.rotary_embed.freqs", "layers.5.1.layers.0.0.to_gates.bias",
                "layers.5.1.layers.0.0.to_out.0.weight", "layers.0.0.layers.0.1.net.4.weight",
                "layers.3.1.norm.gamma", "mask_estimators.0.to_freqs.59.0.4.bias"):
        assert key in keys, key
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 228.2e6) < 0.1e6, params
    estimators = sum(p.numel() for p in model.mask_estimators.parameters())
    assert abs(estimators - 201.5e6) < 0.1e6, estimators


@pytest.mark.parametrize("wrap", WRAPS)
def test_checkpoint_wraps_load(tmp_path, wrap):
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, "mel_band_roformer", wrap=wrap)
    cfg = load_roformer_config(cfg_path)
    model = build_roformer("mel_band_roformer", cfg.model, read_checkpoint(ckpt))
    expected = random_state_dict("mel_band_roformer", cfg.model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_key_errors_list_keys():
    kwargs = _small("bs_roformer")
    state = random_state_dict("bs_roformer", kwargs)
    model = Roformer(RoformerSpec.from_kwargs("bs_roformer", kwargs))
    broken = dict(state)
    del broken["final_norm.gamma"]
    del broken["mask_estimators.0.to_freqs.3.0.2.bias"]
    broken["layers.0.0.linear.weight"] = torch.zeros(3)
    broken["band_split.to_features.0.1.weight"] = torch.zeros(5, 5)
    with pytest.raises(RoformerKeyError) as err:
        load_roformer_state(model, broken)
    msg = str(err.value)
    assert "final_norm.gamma" in msg and "mask_estimators.0.to_freqs.3.0.2.bias" in msg
    assert "layers.0.0.linear.weight" in msg and "band_split.to_features.0.1.weight" in msg
    assert err.value.missing == ["final_norm.gamma", "mask_estimators.0.to_freqs.3.0.2.bias"]
    assert err.value.unexpected == ["layers.0.0.linear.weight"]
    # A Mel-Band checkpoint for a BS config: the mismatch is reported, not silently loaded.
    mel = random_state_dict("mel_band_roformer", _small("mel_band_roformer"))
    with pytest.raises(RoformerKeyError, match="final_norm.gamma"):
        load_roformer_state(model, mel)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hook": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_model_config_validation():
    base = _small("mel_band_roformer")
    with pytest.raises(ValueError, match="unknown model config keys.*mystery"):
        RoformerSpec.from_kwargs("mel_band_roformer", dict(base, mystery=1))
    with pytest.raises(ValueError, match="linear_transformer_depth"):
        RoformerSpec.from_kwargs("mel_band_roformer", dict(base, linear_transformer_depth=1))
    with pytest.raises(ValueError, match="freqs_per_bands"):
        RoformerSpec.from_kwargs("bs_roformer", dict(_small("bs_roformer"), freqs_per_bands=(64, 64)))
    spec = RoformerSpec.from_kwargs("mel_band_roformer", dict(base, linear_transformer_depth=0, sage_attention=True))
    assert spec.zero_dc is True and spec.ignored["sage_attention"] is True


# -- configs ---------------------------------------------------------------------------------------------------

KIM_LIKE = """
audio:
  chunk_size: 352800
  sample_rate: 44100
model:
  dim: 384
  depth: 6
  stereo: true
  num_stems: 1
  num_bands: 60
  multi_stft_resolutions_window_sizes: !!python/tuple
  - 4096
  - 2048
  freqs_ignored: !!python/tuple [1, [2, 3]]
training:
  instruments:
  - vocals
  - other
  target_instrument: vocals
inference:
  batch_size: 4
  num_overlap: 2
"""


def test_config_python_tuple_and_defaults():
    data = parse_yaml(KIM_LIKE)
    assert data["model"]["multi_stft_resolutions_window_sizes"] == (4096, 2048)
    assert data["model"]["freqs_ignored"] == (1, [2, 3])
    cfg = parse_roformer_config(data)
    assert (cfg.chunk_size, cfg.num_overlap, cfg.batch_size, cfg.sample_rate) == (352800, 2, 4, 44100)
    assert cfg.instruments == ("vocals", "other") and cfg.target_instrument == "vocals"
    assert cfg.sources == ("vocals",) and cfg.family == "mel_band_roformer" and cfg.channels == 2


def test_inference_chunk_size_wins():
    data = parse_yaml(KIM_LIKE)
    data["inference"]["chunk_size"] = 485100
    assert parse_roformer_config(data).chunk_size == 485100


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['echo pwned']",
    "!!python/name:os.system",
    "!!python/object:collections.OrderedDict {}",
    "!!python/module:os",
    "!custom 3",
])
def test_config_refuses_python_objects(tag, capfd):
    with pytest.raises(UnsafeConfigError):
        parse_yaml(f"model:\n  dim: {tag}\n")
    assert "pwned" not in capfd.readouterr().out


def test_config_stem_consistency():
    data = parse_yaml(KIM_LIKE)
    data["model"]["num_stems"] = 2
    with pytest.raises(RoformerConfigError, match="target_instrument"):
        parse_roformer_config(data)
    del data["training"]["target_instrument"]
    cfg = parse_roformer_config(data)
    assert cfg.sources == ("vocals", "other")
    data["training"]["instruments"] = ["vocals"]
    with pytest.raises(RoformerConfigError, match="num_stems"):
        parse_roformer_config(data)


def test_fixture_yaml_has_python_tuple(tmp_path):
    cfg_path, _ = make_roformer_checkpoint(tmp_path, "bs_roformer", num_stems=2)
    text = cfg_path.read_text()
    assert "!!python/tuple" in text
    cfg = load_roformer_config(cfg_path)
    assert isinstance(cfg.model["freqs_per_bands"], tuple) and cfg.family == "bs_roformer"
    assert cfg.sources == ("vocals", "drums") and cfg.target_instrument is None
