"""`ripper-dist report`: self-contained pages (no network), the numbers they show, explanation images, and a
headless Chromium screenshot of each page that is not blank."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from explained import explained
from ripper_dist.cli import main
from ripper_dist.report import log_spectrogram, loudness_lufs, peak_dbfs


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The explained Demucs job, evaluated against references (its stems plus noise), and the RoFormer job, with
    their reports."""
    ex = explained(tmp_path_factory)
    root = tmp_path_factory.mktemp("report")
    demucs, roformer = root / "demucs", root / "roformer"
    shutil.copytree(ex.demucs, demucs)
    shutil.copytree(ex.roformer, roformer)
    row = pd.read_parquet(demucs / "metadata.parquet").iloc[0]
    rng = np.random.default_rng(0)
    for stem in ("drums", "bass", "other", "vocals"):
        x, sr = sf.read(demucs / dict(row.stem_paths)[stem], dtype="float32")
        (root / "refs" / row.track).mkdir(parents=True, exist_ok=True)
        sf.write(root / "refs" / row.track / f"{stem}.wav", x + 0.01 * rng.standard_normal(x.shape), sr,
                 subtype="FLOAT")
    assert main(["evaluate", str(demucs), str(root / "refs"), "--engine", "local"]) == 0
    assert main(["report", str(demucs)]) == 0
    assert main(["report", str(roformer)]) == 0
    return demucs, roformer


def _pages(out: Path) -> list[Path]:
    return [out / "report.html", *sorted((out / "report").rglob("*.html"))]


def test_pages_are_self_contained_and_show_the_numbers(reports):
    demucs, roformer = reports
    index, page = _pages(demucs)
    html = page.read_text()
    for p in (index, page, *_pages(roformer)):
        text = p.read_text()
        assert not re.search(r"(src|href)=['\"](https?:)?//", text), p  # nothing from the network
    assert "class='sortable'" in index.read_text() and "evaluation (median over tracks, dB)" in index.read_text()
    assert html.count("data:image/png;base64,") == 2 + 4 * 2 + 4 * 2  # mixture, stems, branch terms
    assert "what each branch contributed" in html
    for src in re.findall(r"<audio[^>]*src='([^']+)'", html):  # players link the stem files, relative
        assert (page.parent / src).resolve().is_file(), src
    row = pd.read_parquet(demucs / "metadata.parquet").iloc[0]
    x, sr = sf.read(demucs / dict(row.stem_paths)["bass"], dtype="float32", always_2d=True)
    bass = html[html.index("<h3>bass</h3>"):]
    assert f"peak {peak_dbfs(x):.1f} dBFS" in bass and f"loudness {loudness_lufs(x, sr):.1f} LUFS" in bass
    ev = pd.read_parquet(demucs / "evaluation.parquet").set_index("stem")
    assert f"SDR {ev.loc['bass', 'sdr']:.2f} dB" in bass and f"bleedless {ev.loc['bass', 'bleedless']:.2f}" in bass
    assert "fullness (0-100)" in index.read_text()
    masks_page = _pages(roformer)[1].read_text()
    assert "per-band masks of vocals" in masks_page and "alt='vocals band masks'" in masks_page


def test_measurements():
    sr = 22050
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)[:, None]
    assert peak_dbfs(tone) == pytest.approx(20 * np.log10(0.5), abs=0.01)
    import pyloudnorm
    assert loudness_lufs(tone, sr) == pytest.approx(pyloudnorm.Meter(sr).integrated_loudness(tone.astype(float)))
    db, freqs, _ = log_spectrogram(tone[:, 0], sr)
    assert abs(freqs[db.mean(axis=1).argmax()] - 1000) < 60  # the tone's row is the loudest


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium() and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it; apt-get install chromium)")
def test_pages_render_in_headless_chromium(reports, tmp_path):
    from matplotlib.image import imread
    browser = _chromium()
    assert browser, "chromium is missing: .ci/run installs Debian's chromium"
    for out in reports:
        for page in _pages(out):
            shot = tmp_path / f"{out.name}-{page.stem}.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                           check=True, capture_output=True, timeout=120)
            img = imread(shot)[..., :3]
            ink = (img.mean(axis=-1) < 0.9).mean()  # share of pixels that are not (near) white
            # the index is a table (text), a track page is mostly images; a blank page has neither
            assert ink > (0.01 if page.name == "report.html" else 0.05), (page, ink)
