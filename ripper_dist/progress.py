"""The progress bar of long work: audio seconds done, x-realtime (audio seconds per wall second) and the ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    """One bar over audio seconds: shows x-realtime (audio seconds per wall second) and the ETA.

    The total may be an estimate that grows (the Ray job learns durations as tracks are planned on the workers)."""

    def __init__(self, total_s: float | None, enabled: bool = True, desc: str = "separating"):
        from tqdm import tqdm
        self.bar = tqdm(total=total_s or 0.0, unit="s", desc=desc, disable=not enabled, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
                        file=sys.stderr)
        self.t0 = time.monotonic()
        self.done = 0.0

    def set_total(self, total_s: float) -> None:
        self.bar.total = max(total_s, self.bar.n)
        self.bar.refresh()

    def update(self, seconds: float) -> None:
        self.done += seconds
        if self.bar.total is not None and self.bar.n + seconds > self.bar.total:
            self.bar.total = self.bar.n + seconds  # durations from headers can be short by a few samples
        self.bar.update(seconds)
        self.bar.set_postfix_str(f"{self.done / max(time.monotonic() - self.t0, 1e-9):.2f}x realtime", refresh=False)

    def close(self) -> None:
        self.bar.close()
