"""Errors as an archive operator needs them: one short line per failure (the row and the terminal), the full
traceback in `OUT/.ripper-dist/errors.log` (appended, never on the terminal).

A short line names the exception type and the first line of its message, capped (a RoFormer key list can be megabytes),
and says "disk full" in words for ENOSPC, whichever layer raised it.
"""
from __future__ import annotations

import errno
import os
import time
import traceback
from pathlib import Path

ERRORS_LOG = ".ripper-dist/errors.log"
MAX_LINE = 400


def is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):  # libsndfile reports it as text
            return True
        e = e.__cause__ or e.__context__
    return False


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most MAX_LINE characters); disk full named as such. An error raised in
    another Ray task (e.g. the `--no-shared-fs` reader) is described by its cause."""
    while isinstance(getattr(e, "cause", None), BaseException):  # ray.exceptions.RayTaskError
        e = e.cause
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.strerror}: {e.filename}"
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    if is_disk_full(e) and "disk full" not in text:
        text = f"disk full ({text})"
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def setup_message(e: BaseException) -> str:
    """The one line `ripper-dist: error: ...` of a usage or setup error (exit 2): the message, capped."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename is not None else e.strerror
    else:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if is_disk_full(e) and "disk full" not in text:
        text = f"disk full: {text}; free space and rerun the same command (finished tracks are kept)"
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def format_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


class ErrorLog:
    """`OUT/.ripper-dist/errors.log`: each failure's input, short line and traceback, appended as they happen."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / ERRORS_LOG

    def write(self, input_path: str, line: str, tb: str | None) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {input_path}\n{line}\n{tb or ''}\n")
        except OSError:  # a full disk must not turn one failed track into a failed job
            pass
