"""Test helper: one tiny Demucs and one tiny Mel-Band RoFormer separated with `--explain`, made once per session
(the export is the costly part) and shared by the explain and report tests."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from ripper_dist.cli import main
from upstream import write_tone


_MADE: dict[int, SimpleNamespace] = {}


def explained(tmp_path_factory) -> SimpleNamespace:
    """The outputs, made on the first call of a session (tmp_path_factory is session-scoped)."""
    if id(tmp_path_factory) not in _MADE:
        _MADE[id(tmp_path_factory)] = _make(tmp_path_factory)
    return _MADE[id(tmp_path_factory)]


def _make(tmp_path_factory) -> SimpleNamespace:
    from ripper_export.random_demucs import make_bag_repo
    from ripper_export.random_roformer import make_roformer_checkpoint
    root = tmp_path_factory.mktemp("explained")
    repo = make_bag_repo(root / "repo", "tiny", 1, seed=3)
    config, ckpt = make_roformer_checkpoint(root / "roformer", "mel_band_roformer", size="small", num_stems=1,
                                            target_instrument="vocals")
    track = write_tone(root / "in" / "song.wav", 1.3, seed=4)
    saved = os.environ.get("RIPPER_DIST_CACHE")
    os.environ["RIPPER_DIST_CACHE"] = str(root / "cache")
    try:
        common = ["separate", str(track), "--engine", "local", "--no-progress", "--subtype", "FLOAT",
                  "--clip-mode", "none", "--explain"]
        assert main([*common, "-o", str(root / "demucs"), "--repo", str(repo), "-n", "tiny"]) == 0
        assert main([*common, "-o", str(root / "roformer_out"), "-n", "mel_band_roformer", "--config", str(config),
                     "--checkpoint", str(ckpt)]) == 0
    finally:
        if saved is None:
            os.environ.pop("RIPPER_DIST_CACHE", None)
        else:
            os.environ["RIPPER_DIST_CACHE"] = saved
    return SimpleNamespace(root=root, repo=repo, config=config, ckpt=ckpt, track=track, cache=root / "cache",
                           demucs=root / "demucs", roformer=root / "roformer_out")
