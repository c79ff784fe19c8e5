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


def _released() -> tuple[dict, dict, dict]:
    """The catalogue's Demucs releases in the shapes this module has always offered (tests patch RELEASED)."""
    from . import catalog
    from .family_registry import local_family
    demucs = [e for e in catalog.entries().values() if e.family == local_family()]
    return ({e.name: ([f.name for f in e.files], e.weights, None) for e in demucs},
            {e.name: {"sources": e.stems, "segment_s": e.segment_s,
                      "sdr_db": next((s["values"]["sdr_db"] for s in e.raw.get("scores") or []
                                      if "sdr_db" in s.get("values", {})), None)} for e in demucs},
            {e.name: e.title for e in demucs})


# name -> (files, weights, segment); files are `<sig>-<sha8>.th` under OFFICIAL_ROOT_URL. RELEASED_INFO: what is known
# of them without their files: sources, segment (s), published SDR (MUSDB18-HQ test, upstream's README). All from the
# model catalogue (catalog.json), the one list of models known by name.
RELEASED, RELEASED_INFO, DESCRIPTIONS = _released()
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


def download(url: str, dest: Path, sha_prefix: str | None, *, progress: bool = True, size: int | None = None,
             sha256: str | None = None, stated_by: str | None = None) -> Path:
    """Download `url` to `dest` atomically, verified before the file gets its final name: the sha256 (or its prefix)
    where known, else the size where known, and always the length the server announced. A record of what was
    checked, with the file's sha256, is kept beside it (`<file>.verify.json`). A network failure is one line naming
    the URL and the reason (ModelSourceError), not a traceback; a file failing verification is ChecksumError and
    nothing is kept."""
    import urllib.error
    try:
        return _download(url, dest, sha_prefix, progress=progress, size=size, sha256=sha256, stated_by=stated_by)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise ModelSourceError(f"cannot download {url}: {reason} (no internet? $RIPPER_DIST_MODEL_URL points the "
                               "downloads at a mirror; or use --repo/--checkpoint/--onnx)") from None


def _download(url: str, dest: Path, sha_prefix: str | None, *, progress: bool = True, size: int | None = None,
              sha256: str | None = None, stated_by: str | None = None) -> Path:
    import hashlib
    import json

    from .atomic import write_text
    digest, got = hashlib.sha256(), 0
    with atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(url, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False)
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            got += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        out.close()
        sha = digest.hexdigest()
        why = f" ({stated_by})" if stated_by else ""
        if total is not None and got != total:
            raise ChecksumError(f"incomplete download of {url}: {got} of {total} bytes; nothing cached, try again")
        if sha256 and sha != sha256.lower():
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {sha256[:16]}...{why}, got "
                                f"{sha[:16]}...; nothing cached")
        if sha_prefix and not sha.startswith(sha_prefix):
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 starting with {sha_prefix}, got "
                                f"{sha[:len(sha_prefix)]}")
        if size is not None and got != size:
            raise ChecksumError(f"size mismatch for {url}: expected {size} bytes{why}, got {got}; nothing cached")
        checked = "sha256" if sha256 else "sha256 prefix" if sha_prefix else "size" if size is not None else "length"
        write_text(_record(dest), json.dumps({"url": url, "size": got, "sha256": sha, "checked": checked}, indent=1))
    return dest


def _record(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verify.json")


def cached_sha256(path: Path) -> str | None:
    """The sha256 recorded when `path` was downloaded and verified (None: no record, or the file changed since)."""
    import json
    try:
        rec = json.loads(_record(Path(path)).read_text())
        return rec["sha256"] if Path(path).stat().st_size == rec["size"] else None
    except (OSError, ValueError, KeyError):
        return None


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


def _url(official: str) -> str:
    """`official`, or the same file name under $RIPPER_DIST_MODEL_URL (a mirror holds every file by its name)."""
    mirror = os.environ.get("RIPPER_DIST_MODEL_URL")
    return mirror.rstrip("/") + "/" + official.rsplit("/", 1)[1] if mirror else official


@dataclass(frozen=True)
class RoformerSource:
    """A catalogue RoFormer, downloaded and verified: its config and checkpoint in the cache."""
    name: str
    family: str
    config: Path
    checkpoint: Path


def fetch_roformer(name: str, *, progress: bool = True) -> RoformerSource:
    """A catalogue RoFormer's config, then its checkpoint, into the cache (verified; a mirror by file name).

    Refused before anything is downloaded when the exporter cannot export it yet. The config comes first (small): it
    must state the catalogue's architecture and stems, so a file changed upstream is noticed before gigabytes."""
    from . import catalog
    entry = catalog.lookup(name)
    if entry is None or not entry.is_roformer:
        raise ModelSourceError(f"-n: {name!r} is not a RoFormer of the model catalogue (ripper-dist models)")
    refuse_unexportable(entry)
    folder = cache_dir() / "checkpoints"
    cfg_file = entry.config_file
    cfg_path = folder / cfg_file.name
    if cached_sha256(cfg_path) is None:
        download(_url(cfg_file.url), cfg_path, None, progress=False)
    try:
        check_config(entry, cfg_path)
    except ModelSourceError:
        cfg_path.unlink(missing_ok=True)
        _record(cfg_path).unlink(missing_ok=True)
        raise
    f = entry.files[0]
    ckpt = folder / f.name
    if cached_sha256(ckpt) is None:
        download(_url(f.url), ckpt, None, progress=progress, size=f.size, sha256=f.sha256, stated_by=f.source)
    return RoformerSource(entry.name, entry.family, cfg_path, ckpt)


def refuse_unexportable(entry) -> None:
    """One line naming what the exporter does not implement yet (before any download)."""
    problems = entry.problems()
    if problems:
        raise ModelSourceError(f"-n {entry.name}: not exportable yet ({entry.family} with {', '.join(problems)}: "
                               "the exporter does not implement this architecture option); nothing downloaded")


def _normal_model(model: dict) -> dict:
    """The `model:` values that change the function: kernel/training-only keys dropped, switches at their 'off'
    value dropped (an upstream file stating `linear_transformer_depth: 0` or not is the same model)."""
    from ripper_export.roformer_config import IGNORED_KEYS
    off = {"linear_transformer_depth": 0, "skip_connection": False, "use_pope": False, "stft_window_fn": None}

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: plain(v) for k, v in model.items() if k not in IGNORED_KEYS and not (k in off and v == off[k])}


def check_config(entry, path: Path) -> None:
    """The downloaded config must describe the catalogue's model (architecture and stems)."""
    from ripper_export.roformer_config import RoformerConfigError, UnsafeConfigError, load_roformer_config

    from .msst_chunking import output_stems
    try:
        cfg = load_roformer_config(path)
    except (RoformerConfigError, UnsafeConfigError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelSourceError(f"{entry.config_file.url}: not a usable RoFormer config ({e}); nothing cached") from None
    want, got = _normal_model(entry.config["model"]), _normal_model(dict(cfg.model))
    diff = sorted(k for k in set(want) | set(got) if want.get(k, "(absent)") != got.get(k, "(absent)"))
    if diff:
        k = diff[0]
        raise ModelSourceError(f"{entry.config_file.url} differs from the catalogue's {entry.name}: model.{k} is "
                               f"{got.get(k, '(absent)')!r}, catalogue {want.get(k, '(absent)')!r}"
                               f"{f' (+{len(diff) - 1} more keys)' if len(diff) > 1 else ''}; the upstream file "
                               "changed: nothing cached")
    stems = output_stems(cfg.instruments, cfg.target_instrument)
    if stems != entry.stems:
        raise ModelSourceError(f"{entry.config_file.url}: stems {stems} differ from the catalogue's {entry.stems} "
                               f"for {entry.name}; the upstream file changed: nothing cached")


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
