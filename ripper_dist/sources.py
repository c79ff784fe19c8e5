"""Where model checkpoints come from: released names (downloaded and sha256-verified), `--repo DIR`, `--checkpoint FILE`.

Mirrors upstream demucs: released files are named `<sig>-<sha8>.th` where sha8 is the first 8 hex digits of the file's
sha256, so every download and every repo file carrying a sha8 is verified before use. Nothing here loads a checkpoint;
it only finds and verifies files (loading is `ripper_export.safe_load`, which never executes code from the file).
"""
from __future__ import annotations

import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import atomic_path
from .hashing import sha256_file

OFFICIAL_ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/"
_ONE_HOT = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]

# name -> (files, weights, segment); files are `<sig>-<sha8>.th` under OFFICIAL_ROOT_URL.
RELEASED = {
    "htdemucs": (["955717e8-8726e21a.th"], None, None),
    "htdemucs_ft": (["f7e0c4bc-ba3fe64a.th", "d12395a8-e57c48e6.th", "92cfc3b6-ef3bcb9c.th", "04573f0d-f3cf25b2.th"],
                    _ONE_HOT, None),
    "htdemucs_6s": (["5c90dfd2-34c22ccb.th"], None, None),
}
_FOUR = ["drums", "bass", "other", "vocals"]
#: What is known of the released models without their files: sources, segment (s), published SDR (MUSDB18-HQ test,
#: median over tracks, mean of the sources; upstream's README) where there is one.
RELEASED_INFO = {
    "htdemucs": {"sources": _FOUR, "segment_s": 7.8, "sdr_db": 8.80},
    "htdemucs_ft": {"sources": _FOUR, "segment_s": 7.8, "sdr_db": 9.00},
    "htdemucs_6s": {"sources": _FOUR + ["guitar", "piano"], "segment_s": 7.8, "sdr_db": None},
}
DESCRIPTIONS = {
    "htdemucs": "Hybrid Transformer Demucs v4: drums, bass, other, vocals (upstream default)",
    "htdemucs_ft": "htdemucs fine-tuned: bag of 4 specialists, one per source (4x slower, a little better)",
    "htdemucs_6s": "htdemucs with 6 sources: adds guitar and piano",
}
_SIG_FILE = re.compile(r"^(?P<sig>[0-9a-f]{8})(?:-(?P<sha>[0-9a-f]{8}))?\.th$")


class ModelSourceError(ValueError):
    """A model name, repo or file that cannot be resolved."""


def released_info(name: str) -> dict:
    return RELEASED_INFO[name]


class ChecksumError(ModelSourceError):
    """A file whose sha256 does not match the prefix in its name."""


def cache_dir() -> Path:
    """User cache: $RIPPER_DIST_CACHE, else $XDG_CACHE_HOME/ripper-dist, else ~/.cache/ripper-dist."""
    env = os.environ.get("RIPPER_DIST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ripper-dist"


def verify_prefix(path: Path, prefix: str) -> str:
    """Return the file's sha256; raise ChecksumError if it does not start with `prefix`."""
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise ChecksumError(f"checksum mismatch for {path}: expected sha256 starting with {prefix}, got {digest[:len(prefix)]}")
    return digest


def download(url: str, dest: Path, sha_prefix: str | None, *, progress: bool = True) -> Path:
    """Download `url` to `dest` atomically; verify the sha256 prefix before the file gets its final name.
    A network failure is one line naming the URL and the reason (ModelSourceError), not a traceback."""
    import urllib.error
    try:
        return _download(url, dest, sha_prefix, progress=progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise ModelSourceError(f"cannot download {url}: {reason} (no internet? $RIPPER_DIST_MODEL_URL points the "
                               "downloads at a mirror; or use --repo/--checkpoint/--onnx)") from None


def _download(url: str, dest: Path, sha_prefix: str | None, *, progress: bool = True) -> Path:
    with atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(url, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False)
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        out.close()
        if sha_prefix:
            verify_prefix(tmp, sha_prefix)
    return dest


@dataclass(frozen=True)
class Member:
    """One sub-model of a bag: its checkpoint file and signature."""
    sig: str
    path: Path


@dataclass(frozen=True)
class DemucsSource:
    """A resolved Demucs model: checkpoint files plus the bag's weights and segment (None = the model's own)."""
    name: str
    members: tuple[Member, ...]
    weights: list[list[float]] | None = None
    segment: float | None = None
    origin: str = field(default="", compare=False)


def _root_url() -> str:
    # Override for mirrors and for tests against a local HTTP server.
    return os.environ.get("RIPPER_DIST_MODEL_URL", OFFICIAL_ROOT_URL).rstrip("/") + "/"


def fetch_released(name: str, *, progress: bool = True) -> DemucsSource:
    """Resolve a released model name, downloading missing files into the cache (verified)."""
    if name not in RELEASED:
        raise ModelSourceError(f"-n: unknown model {name!r}; released models: {', '.join(RELEASED)}; or give --repo "
                               "DIR, --checkpoint FILE.th or --onnx FILE.onnx")
    files, weights, segment = RELEASED[name]
    members = []
    for fname in files:
        m = _SIG_FILE.match(fname)
        dest = cache_dir() / "checkpoints" / fname
        if not dest.exists():
            download(_root_url() + fname, dest, m["sha"], progress=progress)
        members.append(Member(m["sig"], dest))
    return DemucsSource(name, tuple(members), weights, segment, origin=_root_url())


def _find_sig(repo: Path, sig: str) -> Member:
    hits = sorted(p for p in repo.iterdir() if (m := _SIG_FILE.match(p.name)) and m["sig"] == sig)
    if not hits:
        raise ModelSourceError(f"no checkpoint for signature {sig!r} in {repo} (expected {sig}.th or {sig}-<sha8>.th)")
    path = hits[0]
    sha = _SIG_FILE.match(path.name)["sha"]
    if sha:
        verify_prefix(path, sha)
    return Member(sig, path)


def from_repo(repo: Path, name: str) -> DemucsSource:
    """Upstream local-repo layout: `NAME.yaml` bags (`models`, optional `weights`, `segment`) and `<sig>[-<sha8>].th`."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelSourceError(f"--repo {repo} is not a directory")
    bag_file = repo / f"{name}.yaml"
    if bag_file.exists():
        spec = yaml.safe_load(bag_file.read_text()) or {}
        sigs = spec.get("models")
        if not sigs:
            raise ModelSourceError(f"{bag_file} lists no models")
        weights = spec.get("weights")
        if weights is not None and len(weights) != len(sigs):
            raise ModelSourceError(f"{bag_file}: {len(weights)} weight rows for {len(sigs)} models")
        members = tuple(_find_sig(repo, str(s)) for s in sigs)
        seg = spec.get("segment")
        return DemucsSource(name, members, [[float(w) for w in row] for row in weights] if weights else None,
                            float(seg) if seg is not None else None, origin=str(repo))
    if re.fullmatch(r"[0-9a-f]{8}", name):
        return DemucsSource(name, (_find_sig(repo, name),), origin=str(repo))
    raise ModelSourceError(f"model {name!r} not found in {repo}: no {name}.yaml and not a checkpoint signature")


def from_checkpoint(path: Path) -> DemucsSource:
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"checkpoint {path} does not exist")
    m = _SIG_FILE.match(path.name)
    if m and m["sha"]:
        verify_prefix(path, m["sha"])
    return DemucsSource(path.stem, (Member(m["sig"] if m else path.stem, path),), origin=str(path))


def resolve_demucs(name: str | None = None, repo: Path | None = None, checkpoint: Path | None = None,
                   *, progress: bool = True) -> DemucsSource:
    if checkpoint is not None:
        return from_checkpoint(checkpoint)
    name = name or "htdemucs"
    if repo is not None:
        return from_repo(repo, name)
    return fetch_released(name, progress=progress)
