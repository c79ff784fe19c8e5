"""RoFormer checkpoints with random weights plus the YAML configs they ship with, for tests and benchmarks.

`make_roformer_checkpoint(dir, family, size)` writes ``config.yaml`` (PyYAML's default Dumper, so sequences such as
``multi_stft_resolutions_window_sizes`` carry ``!!python/tuple`` like the community files) and a checkpoint that is a
raw state dict or a wrapped one. ``size="vocals"`` is Kim's vocals configuration (dim 384, depth 6, 60 bands,
n_fft 2048, hop 441, chunk 352800, num_overlap 2: 228M parameters, a 913 MB file).

`write_roformer_checkpoint(dir, family, config)` does the same for any config mapping, e.g. a model catalogue entry's
(`ripper_dist.catalog.Entry.config`, released size) or `small_config` of it (the same architecture at test size).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch
import yaml

from ripper_export.roformer import Roformer, RoformerSpec

#: Small BS bands for n_fft 256 (129 bins).
SMALL_BS_BANDS = (4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 48, 1)

SMALL_MODEL = dict(
    dim=32, depth=1, time_transformer_depth=1, freq_transformer_depth=1, dim_head=16, heads=2,
    attn_dropout=0, ff_dropout=0, flash_attn=True, stft_n_fft=256, stft_hop_length=64, stft_win_length=256,
    stft_normalized=False, mask_estimator_depth=2,
    multi_stft_resolution_loss_weight=1.0, multi_stft_resolutions_window_sizes=(4096, 2048, 1024, 512, 256),
    multi_stft_hop_size=147, multi_stft_normalized=False,
)
SMALL_CHUNK = 64 * 40          # 2560 samples, 41 frames

VOCALS_MODEL = dict(
    dim=384, depth=6, time_transformer_depth=1, freq_transformer_depth=1, num_bands=60, dim_head=64, heads=8,
    attn_dropout=0, ff_dropout=0, flash_attn=True, dim_freqs_in=1025, sample_rate=44100, stft_n_fft=2048,
    stft_hop_length=441, stft_win_length=2048, stft_normalized=False, mask_estimator_depth=2,
    multi_stft_resolution_loss_weight=1.0, multi_stft_resolutions_window_sizes=(4096, 2048, 1024, 512, 256),
    multi_stft_hop_size=147, multi_stft_normalized=False,
)
VOCALS_CHUNK = 352800

WRAPS = (None, "state_dict", "model_state_dict", "state", "model", "lightning")


def _instruments(num_stems: int, target: str | None) -> tuple[list[str], str | None]:
    names = ["vocals", "drums", "bass", "other", "guitar", "piano"]
    if num_stems == 1 and target:
        return [target, "other" if target != "other" else "vocals"], target
    if num_stems == 1:
        return ["vocals"], None
    return names[:num_stems], None


def make_config(family: str = "mel_band_roformer", size: str = "small", *, num_stems: int = 1,
                target_instrument: str | None = "vocals", stereo: bool = True, model_overrides: dict | None = None,
                chunk_size: int | None = None, num_overlap: int | None = None, batch_size: int = 2) -> dict:
    """The config mapping (as the YAML holds it)."""
    if size == "small":
        model = dict(SMALL_MODEL)
        if family == "mel_band_roformer":
            model.update(num_bands=8, sample_rate=44100)
        else:
            model.update(freqs_per_bands=SMALL_BS_BANDS)
        chunk = SMALL_CHUNK
        overlap = 2
    elif size == "vocals":
        if family != "mel_band_roformer":
            raise ValueError("size='vocals' is Kim's Mel-Band RoFormer")
        model = dict(VOCALS_MODEL)
        chunk, overlap = VOCALS_CHUNK, 2
        batch_size = 4 if batch_size == 2 else batch_size
    else:
        raise ValueError(f"unknown size {size!r}")
    model = {"dim": model.pop("dim"), "depth": model.pop("depth"), "stereo": stereo, "num_stems": num_stems,
             **model}
    model.update(model_overrides or {})
    instruments, target = _instruments(num_stems, target_instrument)
    training = {"batch_size": 4, "instruments": instruments, "lr": 1.0e-05, "use_amp": True}
    if target:
        training["target_instrument"] = target
    return {
        "audio": {"chunk_size": chunk, "n_fft": model["stft_n_fft"], "hop_length": model["stft_hop_length"],
                  "num_channels": 2 if stereo else 1, "sample_rate": 44100, "min_mean_abs": 0.0},
        "model": model,
        "training": training,
        "inference": {"batch_size": batch_size, "num_overlap": num_overlap or overlap,
                      **({"chunk_size": chunk_size} if chunk_size else {})},
    }


def random_state_dict(family: str, model_kwargs: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a freshly initialised model (norm gains jittered so that loading them matters)."""
    torch.manual_seed(seed)
    model = Roformer(RoformerSpec.from_kwargs(family, model_kwargs))
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for k, v in state.items():
        if k.endswith("gamma"):
            v = v + 0.2 * torch.randn(v.shape, generator=gen)
        out[k] = v.detach().clone()
    return out


#: `small_config`: the sizes that only scale cost, at test size. Two heads (not one) keep the head split tested, and
#: heads * dim_head need not equal dim (as in the released configs: 8 x 64 against dim 384).
SMALL_SIZES = dict(dim=32, heads=2, dim_head=16)
#: `small_config`: at most this many layers (each layer is the same pair of transformers; two still test the order of
#: the `layers.{i}` keys and the data flow from one layer to the next).
SMALL_DEPTH = 2
#: `small_config`: STFT hops per chunk (17 frames, about 0.16 s at hop 441): time attention sees a shorter sequence.
SMALL_HOPS = 16


def small_config(config: Mapping) -> dict:
    """A config (sections `audio:`, `model:`, `training:`, `inference:`) shrunk to test size, same architecture.

    Shrunk, as they only scale the cost: `dim`, `heads`, `dim_head` (`SMALL_SIZES`), `depth` (at most
    `SMALL_DEPTH`), and the chunk (`audio.chunk_size`, and `inference.chunk_size` where stated) to `SMALL_HOPS`
    STFT hops plus the released chunk's remainder modulo the hop (so a chunk that is not a whole number of hops stays
    one). Everything else is kept as stated: the family keys (`num_bands` and `sample_rate`, or `freqs_per_bands`),
    the STFT settings (with the family keys they fix the band structure: which bins each band holds, so every
    band-split and mask-estimator input width is the released one), `stereo`, `num_stems`, `mask_estimator_depth`,
    `mlp_expansion_factor`, the time/freq/linear transformer depths, every switch (`zero_dc`, `skip_connection`,
    `use_pope`, ...) and key the exporter ignores, the instruments and target, `num_overlap` and `batch_size`.
    """
    out = copy.deepcopy(dict(config))
    model = dict(out["model"])
    model.update(SMALL_SIZES)
    model["depth"] = min(int(model["depth"]), SMALL_DEPTH)
    hop = int(model.get("stft_hop_length", 512))
    for section in ("audio", "inference"):
        sec = dict(out.get(section) or {})
        if sec.get("chunk_size"):
            sec["chunk_size"] = SMALL_HOPS * hop + int(sec["chunk_size"]) % hop
            out[section] = sec
    out["model"] = model
    return out


def write_roformer_checkpoint(directory, family: str, config: Mapping, *, wrap: str | None = None, seed: int = 0,
                              config_name: str = "config.yaml", checkpoint_name: str = "model.ckpt"
                              ) -> tuple[Path, Path]:
    """`config` as a YAML file (sequences of `model:` as ``!!python/tuple``, like the community files) and a random
    checkpoint of its model in the official format (`wrap` as in `make_roformer_checkpoint`) under `directory`;
    returns ``(config_path, ckpt_path)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(dict(config))
    cfg["model"] = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"].items()}
    state = random_state_dict(family, cfg["model"], seed)
    cfg_path = directory / config_name
    cfg_path.write_text(yaml.dump(cfg, Dumper=yaml.Dumper, sort_keys=False), encoding="utf-8")
    ckpt_path = directory / checkpoint_name
    torch.save(_wrapped(state, wrap), ckpt_path)
    return cfg_path, ckpt_path


def _wrapped(state: dict, wrap: str | None):
    if wrap is None:
        return state
    if wrap == "lightning":
        return {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "loops": {"fit_loop": {"state_dict": {}}}, "optimizer_states": [], "lr_schedulers": []}
    if wrap in WRAPS:
        return {wrap: state, "epoch": 7, "best_sdr": 9.5}
    raise ValueError(f"unknown wrap {wrap!r}")


def make_roformer_checkpoint(directory, family: str = "mel_band_roformer", size: str = "small", wrap: str | None = None,
                             num_stems: int = 1, target_instrument: str | None = "vocals", *, stereo: bool = True,
                             seed: int = 0, model_overrides: dict | None = None, chunk_size: int | None = None,
                             num_overlap: int | None = None) -> tuple[Path, Path]:
    """Write ``config.yaml`` and a checkpoint under `directory`; returns ``(config_path, ckpt_path)``.

    `wrap`: None (raw state dict, ``model.ckpt``), ``state_dict``/``model_state_dict``/``state``/``model`` (a dict
    holding the state dict under that key plus plain extras), or ``lightning`` (``.ckpt`` with ``model.``-prefixed
    keys under ``state_dict`` and Lightning's plain bookkeeping entries).
    """
    if wrap is not None and wrap not in WRAPS:
        raise ValueError(f"unknown wrap {wrap!r}")
    cfg = make_config(family, size, num_stems=num_stems, target_instrument=target_instrument, stereo=stereo,
                      model_overrides=model_overrides, chunk_size=chunk_size, num_overlap=num_overlap)
    return write_roformer_checkpoint(directory, family, cfg, wrap=wrap, seed=seed)
