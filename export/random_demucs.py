"""Random-weight HTDemucs checkpoints in the official Demucs `.th` format: for tests, benchmarks and the demo.

Stable API (other test modules import it):

- `make_htdemucs_checkpoint(path, *, size="small", sources=4, bottom_channels=None, seed=0, half=True,
  segment=None, extra_kwargs=None) -> Path`
- `make_bag_repo(directory, name, n_models, weights=None, *, size="small", sources=4, segment=None,
  model_segment=None, seed=0) -> Path`
- `htdemucs_kwargs(size="small", sources=4, bottom_channels=None, segment=None) -> dict`
- `SOURCES_4`, `SOURCES_6`, `SIZES`

A file is `torch.save({'klass': HTDemucs, 'args': (), 'kwargs': {...}, 'state': {...}, 'training_args': {...}})`,
as `demucs.states.serialize_model` writes it: `kwargs` is the full constructor config the training code passes
(sources, audio_channels, samplerate, segment as a `Fraction`, plus every `htdemucs` option), `state` is the
state dict cast to fp16 when `half` (like `get_state(model, None, half=True)`), `training_args` plain containers.

Weights are the upstream random init, except that the LayerScale gains (transformer and DConv branches, which
upstream initialises to 1e-4 / 1e-3) are raised to 0.1-0.5 so those branches actually contribute to the output and a
parity test exercises them.

Sizes:
- "small": channels 8, depth 4, t_layers 2 (one self-attention and one cross-attention layer), bottom_channels 32
  (0 for 6 sources), t_heads 4, nfft 4096, segment 6/5 s (52920 samples). 0.34M parameters (0.48M with 6
  sources): export + ORT check in about 5 s on an idle 2-core CPU.
- "released": the released htdemucs kwargs (channels 48, depth 4, t_layers 5, bottom_channels 512, dconv_mode 3,
  segment Fraction(39, 5)); `sources=6` gives the htdemucs_6s layout (bottom_channels 0). About 42M parameters.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import torch

SOURCES_4 = ["drums", "bass", "other", "vocals"]
SOURCES_6 = ["drums", "bass", "other", "vocals", "guitar", "piano"]

# Overrides of the HTDemucs class defaults, per size. `bottom_channels` is for 4 sources; 6 sources use 0.
SIZES = {
    "small": dict(channels=8, depth=4, t_layers=2, t_heads=4, bottom_channels=32, dconv_mode=3,
                  segment=Fraction(6, 5)),
    "released": dict(channels=48, depth=4, t_layers=5, t_heads=8, bottom_channels=512, dconv_mode=3,
                     segment=Fraction(39, 5)),
}

_EXTRA_KEYS = ("sources", "audio_channels", "samplerate", "segment")


def _source_list(sources: int | Sequence[str]) -> list[str]:
    if isinstance(sources, int):
        if sources == 4:
            return list(SOURCES_4)
        if sources == 6:
            return list(SOURCES_6)
        return [f"source{i}" for i in range(sources)]
    return list(sources)


def htdemucs_kwargs(size: str = "small", sources: int | Sequence[str] = 4, bottom_channels: int | None = None,
                    segment: Fraction | float | None = None) -> dict:
    """The full `kwargs` dict of a checkpoint: every HTDemucs option (class defaults overridden by `size`)."""
    from demucs.htdemucs import HTDemucs

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    over = dict(SIZES[size])
    srcs = _source_list(sources)
    if bottom_channels is None:
        bottom_channels = over["bottom_channels"] if len(srcs) == 4 else 0
    over["bottom_channels"] = bottom_channels
    seg = over.pop("segment") if segment is None else segment
    over.pop("segment", None)
    if isinstance(seg, float):
        seg = Fraction(seg).limit_denominator(1000)
    # what demucs.train.get_model passes: the dset-derived extras, then the htdemucs config section
    kwargs = {"sources": srcs, "audio_channels": 2, "samplerate": 44100, "segment": seg}
    for name, p in inspect.signature(HTDemucs).parameters.items():
        if name in _EXTRA_KEYS or p.default is inspect.Parameter.empty:
            continue
        kwargs[name] = over.pop(name) if name in over else p.default
    assert not over, over
    return kwargs


def _raise_layer_scales(model: torch.nn.Module, gen: torch.Generator) -> None:
    from demucs.demucs import LayerScale as DLayerScale
    from demucs.transformer import LayerScale as TLayerScale

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (DLayerScale, TLayerScale)):
                m.scale.copy_(0.1 + 0.4 * torch.rand(m.scale.shape, generator=gen))


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_htdemucs_package(*, size: str = "small", sources: int | Sequence[str] = 4,
                          bottom_channels: int | None = None, seed: int = 0, half: bool = True,
                          segment: Fraction | float | None = None, extra_kwargs: dict | None = None) -> dict:
    """The in-memory package dict (what `make_htdemucs_checkpoint` saves)."""
    from demucs.htdemucs import HTDemucs

    kwargs = htdemucs_kwargs(size, sources, bottom_channels, segment)
    torch.manual_seed(seed)
    model = HTDemucs(**kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    _raise_layer_scales(model, gen)
    dtype = torch.half if half else None
    state = {k: p.data.to(device="cpu", dtype=dtype) for k, p in model.state_dict().items()}
    saved_kwargs = dict(kwargs)
    if extra_kwargs:
        saved_kwargs.update(extra_kwargs)
    training_args = {
        "model": "htdemucs",
        "seed": seed,
        "dset": {"sources": list(kwargs["sources"]), "channels": 2, "samplerate": 44100,
                 "segment": float(kwargs["segment"])},
        "htdemucs": {k: v for k, v in kwargs.items() if k not in _EXTRA_KEYS and not isinstance(v, Fraction)},
        "fixture": {"size": size},
    }
    return {"klass": HTDemucs, "args": (), "kwargs": saved_kwargs, "state": state, "training_args": training_args}


def make_htdemucs_checkpoint(path: str | os.PathLike, *, size: str = "small", sources: int | Sequence[str] = 4,
                             bottom_channels: int | None = None, seed: int = 0, half: bool = True,
                             segment: Fraction | float | None = None, extra_kwargs: dict | None = None) -> Path:
    """Write a random-weight HTDemucs checkpoint in the official `.th` format and return its path.

    sources: 4 (drums, bass, other, vocals), 6 (+ guitar, piano; htdemucs_6s layout, bottom_channels 0), another
    int (source0..), or a list of names. bottom_channels: None = the size's default (0 for 6 sources).
    segment: the training segment in seconds (Fraction or float); None = the size's default.
    extra_kwargs: added to the saved kwargs only (e.g. an unknown key, to test upstream's strict=False dropping).
    Deterministic for a given (size, sources, bottom_channels, seed, segment).
    """
    path = Path(path)
    pkg = make_htdemucs_package(size=size, sources=sources, bottom_channels=bottom_channels, seed=seed,
                                half=half, segment=segment, extra_kwargs=extra_kwargs)
    _atomic_save(pkg, path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_bag_repo(directory: str | os.PathLike, name: str, n_models: int,
                  weights: Sequence[Sequence[float]] | None = None, *, size: str = "small",
                  sources: int | Sequence[str] = 4, segment: float | None = None,
                  model_segment: Fraction | float | None = None, seed: int = 0) -> Path:
    """Write a local Demucs repo (upstream layout) holding one bag and return `directory`.

    Files: `NAME.yaml` (`models: [sig, ...]`, plus `weights` and `segment` when given) and one
    `<sig>-<sha8>.th` per model, sha8 = first 8 hex digits of the file's sha256 (as upstream `save_with_checksum`
    names them and `LocalRepo` verifies them). Model i uses seed `seed + i`; its signature is a deterministic
    8-hex-digit string derived from (name, i). `segment` goes into the bag YAML (the bag's split segment);
    `model_segment` sets each model's training segment (None = the size's default).
    Loadable by upstream: `demucs.pretrained.get_model(NAME, repo=directory)`.
    """
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    srcs = _source_list(sources)
    if weights is not None:
        weights = [[float(w) for w in row] for row in weights]
        if len(weights) != n_models or any(len(row) != len(srcs) for row in weights):
            raise ValueError(f"weights must be {n_models} rows of {len(srcs)} values")
    sigs = []
    for i in range(n_models):
        sig = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()[:8]
        tmp = directory / f"{sig}.th.partial"
        pkg = make_htdemucs_package(size=size, sources=srcs, seed=seed + i, segment=model_segment)
        torch.save(pkg, tmp)
        final = directory / f"{sig}-{_sha256(tmp)[:8]}.th"
        os.replace(tmp, final)
        sigs.append(sig)
    bag: dict = {"models": sigs}
    if weights is not None:
        bag["weights"] = weights
    if segment is not None:
        bag["segment"] = float(segment)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(bag, sort_keys=False))
    return directory
