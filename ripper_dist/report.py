"""`ripper-dist report OUT`: self-contained HTML pages a learner opens first, written beside the stems.

- `OUT/report.html`: the job's metadata table (one row per input; click a header to sort), the evaluation medians when
  `OUT/evaluation.parquet` exists, links to the track pages;
- `OUT/report/<model>/<track>.html`: the mixture and every stem as a waveform and a log-frequency spectrogram, an
  `<audio>` player (a relative link to the file, so the page plays it offline), peak (dBFS) and integrated loudness
  (LUFS, ITU-R BS.1770 through pyloudnorm), the stem's evaluation scores; with `--explain` outputs, each stem's
  time-branch and spectral-branch terms side by side (Demucs) or its per-band masks as a band x time heat map
  (RoFormer).

Images are PNGs drawn by matplotlib (Agg) and embedded as data URIs; the pages load nothing from the network.
Only the stems' files are read (never the model), so a report can be made anywhere OUT is mounted.
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
import sys
from pathlib import Path

import numpy as np

from .atomic import write_text

BRANCHES = ("time", "spec")      # Demucs explanation terms: STEM.time + STEM.spec = STEM
MASKS = "masks"                  # RoFormer explanation: STEM.masks.npy (bands x frames)
N_FFT = 2048
MAX_COLUMNS = 1200               # spectrogram and waveform resolution (time axis), whatever the track's length
FREQ_ROWS = 256                  # log-spaced frequency rows of a spectrogram image

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em;margin:.4em 0}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#eef;cursor:pointer;user-select:none}td.l,th.l{text-align:left}
.stem{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}img{max-width:100%;height:auto}
.k{color:#555;font-size:.85em}.failed{color:#b00}audio{width:420px;max-width:100%}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v !== undefined ? a.cells[col].dataset.v : a.cells[col].textContent;
      var y = b.cells[col].dataset.v !== undefined ? b.cells[col].dataset.v : b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
"""


# -- measurements ----------------------------------------------------------------------------------------------------
def peak_dbfs(x: np.ndarray) -> float:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return 20 * np.log10(peak) if peak > 0 else float("-inf")


def loudness_lufs(x: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4); -inf for silence or audio shorter than one 400 ms block."""
    import pyloudnorm
    if x.shape[0] < int(0.4 * sample_rate):
        return float("-inf")
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(sample_rate).integrated_loudness(x.astype(np.float64)))


def log_spectrogram(mono: np.ndarray, sample_rate: int, columns: int = MAX_COLUMNS,
                    rows: int = FREQ_ROWS) -> tuple[np.ndarray, np.ndarray, float]:
    """(dB magnitudes (rows, frames) on log-spaced frequencies, those frequencies, seconds per frame): at most
    `columns` frames whatever the length (the hop grows with the track)."""
    n = mono.shape[0]
    hop = max(N_FFT // 4, int(np.ceil(n / columns)))
    x = np.pad(mono.astype(np.float32), (N_FFT // 2, N_FFT // 2))
    starts = np.arange(0, max(n, 1), hop)
    win = np.hanning(N_FFT).astype(np.float32)
    frames = np.stack([np.pad(x[s:s + N_FFT], (0, max(0, N_FFT - len(x[s:s + N_FFT])))) for s in starts]) * win
    mag = np.abs(np.fft.rfft(frames, axis=-1)).T                       # (bins, frames)
    freqs = np.fft.rfftfreq(N_FFT, 1 / sample_rate)
    f_lo = max(20.0, freqs[1])
    grid = np.geomspace(f_lo, sample_rate / 2, rows)
    idx = np.clip(np.searchsorted(freqs, grid), 1, len(freqs) - 1)
    db = 20 * np.log10(np.maximum(mag[idx], 1e-6))
    return db, grid, hop / sample_rate


def envelope(x: np.ndarray, columns: int = MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the minimum and maximum sample (what a waveform drawing needs)."""
    n = x.shape[0]
    cols = max(1, min(columns, n))
    edges = np.linspace(0, n, cols + 1).astype(int)
    lo = np.minimum.reduceat(x, edges[:-1]) if n else np.zeros(1)
    hi = np.maximum.reduceat(x, edges[:-1]) if n else np.zeros(1)
    return lo, hi


# -- images ----------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, height), dpi=80)


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def waveform_png(x: np.ndarray, sample_rate: int, title: str) -> str:
    fig, ax = _figure(7, 1.6)
    t = np.linspace(0, x.shape[0] / sample_rate, min(MAX_COLUMNS, max(x.shape[0], 1)))
    for c in range(x.shape[1]):
        lo, hi = envelope(x[:, c])
        ax.fill_between(t[:len(lo)], lo, hi, alpha=0.6, linewidth=0, label=f"ch {c + 1}")
    ax.set_xlim(0, max(x.shape[0] / sample_rate, 1e-3))
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("s", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def spectrogram_png(x: np.ndarray, sample_rate: int, title: str, vmax: float | None = None) -> str:
    db, freqs, dt = log_spectrogram(x.mean(axis=1), sample_rate)
    fig, ax = _figure(7, 2.4)
    top = float(db.max()) if vmax is None else vmax
    im = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=top - 90, vmax=top,
                   extent=(0, db.shape[1] * dt, 0, len(freqs)))
    ticks = [f for f in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if freqs[0] <= f <= freqs[-1]]
    ax.set_yticks([np.searchsorted(freqs, f) for f in ticks], [f"{f / 1000:g}k" if f >= 1000 else str(f)
                                                                for f in ticks])
    ax.set_ylabel("Hz (log)", fontsize=8)
    ax.set_xlabel("s", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, label="dB", pad=0.01)
    return _png(fig)


def masks_png(masks: np.ndarray, hop_s: float, title: str) -> str:
    """A band x time heat map of mask magnitudes."""
    fig, ax = _figure(7, 2.4)
    im = ax.imshow(masks, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(0, masks.shape[1] * hop_s, 0, masks.shape[0]))
    ax.set_ylabel("band", fontsize=8)
    ax.set_xlabel("s", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, label="|mask|", pad=0.01)
    return _png(fig)


# -- pages -----------------------------------------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return "-inf" if v == float("-inf") else f"{v:.{digits}f}"
    return str(v)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"</head><body>{body}<script>{SORT_JS}</script></body></html>")


def _table(headers: list[str], rows: list[list], left: int = 1) -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = " class='l'" if i < left else ""
            if isinstance(v, tuple):  # (html, sort value)
                cells.append(f"<td{cls} data-v='{_e(v[1])}'>{v[0]}</td>")
            else:
                cells.append(f"<td{cls}>{_e(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "model"


def _read(path: Path):
    import soundfile as sf
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return x, int(sr)


def _stem_groups(stem_paths: dict) -> dict[str, dict[str, str]]:
    """stem -> {"audio": path, "time": path, "spec": path, "masks": path} from a row's stem paths."""
    groups: dict[str, dict[str, str]] = {}
    for key, rel in stem_paths.items():
        base, _, kind = key.rpartition(".")
        if base and kind in (*BRANCHES, MASKS) and base in stem_paths:
            groups.setdefault(base, {})[kind] = rel
        else:
            groups.setdefault(key, {})["audio"] = rel
    return groups


def _audio_block(path: Path, page_dir: Path, title: str, scores: dict | None, extra: str = "") -> str:
    x, sr = _read(path)
    rel = os.path.relpath(path, page_dir)
    stats = (f"peak {_fmt(peak_dbfs(x), 1)} dBFS &middot; loudness {_fmt(loudness_lufs(x, sr), 1)} LUFS &middot; "
             f"{x.shape[0] / sr:.1f} s, {sr} Hz, {x.shape[1]} ch")
    score = ""
    if scores:
        score = " &middot; ".join([f"{k.upper() if k != 'si_sdr' else 'SI-SDR'} {_fmt(scores.get(k))} dB"
                                   for k in ("sdr", "sir", "isr", "sar", "sdr_track", "si_sdr")
                                   if scores.get(k) is not None]
                                  + [f"{k} {_fmt(scores.get(k))}" for k in ("l1_freq", "bleedless", "fullness")
                                     if scores.get(k) is not None])  # MSST's 0..100 scores
        if scores.get("status") == "failed":
            score = f"<span class='failed'>evaluation failed: {_e(scores.get('error'))}</span>"
    return (f"<div class='stem'><h3>{_e(title)}</h3><div class='k'>{stats}</div>"
            + (f"<div class='k'>{score}</div>" if score else "")
            + f"<audio controls preload='none' src='{_e(rel)}'></audio>"
            + f"<div class='row'><img alt='waveform of {_e(title)}' src='{waveform_png(x, sr, title + ' waveform')}'>"
            + f"<img alt='spectrogram of {_e(title)}' src='{spectrogram_png(x, sr, title + ' spectrogram')}'></div>"
            + extra + "</div>")


def _explain_block(stem: str, files: dict, out: Path, row_rate: int) -> str:
    parts = []
    if all(b in files for b in BRANCHES):
        imgs = []
        peak = None
        data = {}
        for b in BRANCHES:
            x, sr = _read(out / files[b])
            data[b] = (x, sr)
            db, _, _ = log_spectrogram(x.mean(axis=1), sr)
            peak = max(peak, float(db.max())) if peak is not None else float(db.max())
        for b, label in zip(BRANCHES, ("time branch", "spectral branch")):
            x, sr = data[b]
            imgs.append(f"<img alt='{_e(stem)} {label}' src='{spectrogram_png(x, sr, f'{stem}: {label}', peak)}'>")
        energy = {b: float(np.sum(data[b][0].astype(np.float64) ** 2)) for b in BRANCHES}
        share = energy["time"] / max(energy["time"] + energy["spec"], 1e-20)
        parts.append(f"<h3>what each branch contributed (time + spectral = {_e(stem)})</h3>"
                     f"<div class='k'>energy share: time branch {100 * share:.0f} %, spectral branch "
                     f"{100 * (1 - share):.0f} %</div><div class='row'>{''.join(imgs)}</div>")
    if MASKS in files:
        m = np.load(out / files[MASKS])
        duration = None
        if "audio" in files:
            import soundfile as sf
            duration = sf.info(str(out / files["audio"])).duration
        hop_s = (duration / max(m.shape[1] - 1, 1)) if duration else 1.0 / max(row_rate, 1)
        parts.append(f"<h3>per-band masks of {_e(stem)} (the model's estimate, before bands are averaged)</h3>"
                     f"<img alt='{_e(stem)} band masks' src='{masks_png(m, hop_s, f'{stem}: |mask| per band')}'>")
    return "".join(parts)


def track_page(row: dict, out: Path, page: Path, scores: dict[str, dict]) -> str:
    page_dir = page.parent
    groups = _stem_groups(dict(row.get("stem_paths") or {}))
    meta = [("input", row.get("input_path")), ("model", row.get("model")), ("duration", _fmt(row.get("duration_s"))
             + " s"), ("sample rate", row.get("sample_rate")), ("channels", row.get("channels")),
            ("separated in", _fmt(row.get("elapsed_s")) + " s"), ("x realtime", _fmt(row.get("realtime_x"))),
            ("node / worker", f"{row.get('node')} / {row.get('worker')}"), ("engine", row.get("engine"))]
    body = [f"<p><a href='{_e(os.path.relpath(out / 'report.html', page_dir))}'>&larr; all tracks</a></p>",
            f"<h1>{_e(row['track'])}</h1>",
            "<table>" + "".join(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>" for k, v in meta)
            + "</table>"]
    mix = Path(str(row.get("input_path")))
    if mix.is_file():
        try:
            body.append("<h2>mixture</h2>" + _audio_block(mix, page_dir, "mixture", None))
        except Exception as e:  # noqa: BLE001 - an input soundfile cannot read (mp3 without libsndfile support)
            body.append(f"<p class='k'>mixture not shown: {_e(e)}</p>")
    body.append("<h2>stems</h2>")
    for stem, files in groups.items():
        if "audio" not in files:
            continue
        extra = _explain_block(stem, files, out, int(row.get("sample_rate") or 44100))
        body.append(_audio_block(out / files["audio"], page_dir, stem, scores.get(stem), extra))
    return _page(f"{row['track']} - ripper-dist", "".join(body))


def _rows(out: Path) -> list[dict]:
    from .manifest import Manifest
    rows = list(Manifest(out).rows.values())
    if not rows:
        raise ValueError(f"{out}: no metadata.parquet rows (is it a `ripper-dist separate` output folder?)")
    return sorted(rows, key=lambda r: (str(r.get("model")), str(r.get("track"))))


def make_report(out: str | os.PathLike) -> Path:
    """Write `OUT/report.html` and one page per finished track; returns the index page's path."""
    from .evaluate import medians, read_evaluation
    out = Path(out)
    rows = _rows(out)
    evaluation = read_evaluation(out)
    scores: dict[tuple, dict] = {(r["model"], r["track"], r["stem"]): r for r in evaluation}
    by_track: dict[tuple, dict] = {}
    for r in evaluation:
        by_track.setdefault((r["model"], r["track"]), {})[r["stem"]] = r
    table = []
    for r in rows:
        model = str(r.get("model") or "")
        link = r["track"]
        if r.get("status") == "done":
            page = out / "report" / safe_name(model) / f"{safe_name(r['track'])}.html"
            ref_name = _reference_name(r, by_track, model)
            own = {stem: scores[(model, ref_name, stem)] for stem in by_track.get((model, ref_name), {})}
            write_text(page, track_page(r, out, page, own))
            link = f"<a href='{_e(page.relative_to(out))}'>{_e(r['track'])}</a>"
        sdrs = [s["sdr"] for s in by_track.get((model, _reference_name(r, by_track, model)), {}).values()
                if s.get("sdr") is not None]
        table.append([(link, r["track"]), model, r.get("status"), r.get("duration_s"), r.get("sample_rate"),
                      r.get("channels"), r.get("elapsed_s"), r.get("realtime_x"),
                      float(np.median(sdrs)) if sdrs else None, len(dict(r.get("stem_paths") or {})), r.get("node"),
                      r.get("engine"), (_e(r.get("error") or ""), r.get("error") or "")])
    done = sum(r.get("status") == "done" for r in rows)
    body = [f"<h1>ripper-dist report: {_e(out.resolve().name)}</h1>",
            f"<p class='k'>{len(rows)} inputs, {done} done, {len(rows) - done} failed. Click a column to sort; a "
            "track's page shows its stems.</p>",
            _table(["track", "model", "status", "duration s", "rate", "ch", "elapsed s", "x realtime",
                    "median SDR dB", "files", "node", "engine", "error"], table, left=3)]
    if evaluation:
        med = medians(evaluation)
        body.append("<h2>evaluation (median over tracks, dB)</h2>")
        body.append(_table(["model", "stem", "tracks", "SDR", "SIR", "ISR", "SAR", "SDR (whole track)", "SI-SDR",
                            "l1_freq (0-100)", "bleedless (0-100)", "fullness (0-100)"],
                           [[m["model"], m["stem"], m["tracks"], m["sdr"], m["sir"], m["isr"], m["sar"],
                             m["sdr_track"], m["si_sdr"], m["l1_freq"], m["bleedless"], m["fullness"]] for m in med],
                           left=2))
    index = out / "report.html"
    write_text(index, _page(f"ripper-dist report: {out.name}", "".join(body)))
    return index


def _reference_name(row: dict, by_track: dict, model: str) -> str:
    """The track name evaluation rows use for this row (the reference folder's; see evaluate.reference_name)."""
    if (model, row["track"]) in by_track:
        return row["track"]
    from .evaluate import reference_name
    names = {t: True for (m, t) in by_track if m == model}
    return reference_name(str(row.get("input_path")), row["track"], names) or row["track"]


def main(out: str | os.PathLike) -> int:
    index = make_report(out)
    print(f"report: {index} (tracks in {Path(out) / 'report'}/)", file=sys.stderr)
    return 0
