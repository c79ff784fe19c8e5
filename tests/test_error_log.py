"""One line per failure (disk full named, long messages capped, Ray task errors by their cause); tracebacks in the
log file."""
import errno

from ripper_dist.error_log import MAX_LINE, ErrorLog, format_traceback, one_line, setup_message


def test_one_line():
    assert one_line(OSError(errno.ENOSPC, "No space left on device", "/o/t/a.wav")) == \
        "disk full (OSError: No space left on device: /o/t/a.wav)"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("Error writing: System error.") from e
    except RuntimeError as e:  # libsndfile's text, with the errno only in the cause
        assert one_line(e).startswith("disk full (RuntimeError: Error writing")
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert len(one_line(KeyError("k" * 10 ** 6))) == MAX_LINE
    assert one_line(MemoryError()) == "MemoryError"

    class RayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray::NodeIO.read()\n  File ...")
            self.cause = cause
    assert one_line(RayTaskError(ValueError("inner"))) == "ValueError: inner"
    assert setup_message(OSError(errno.EROFS, "-o out: cannot write there (Read-only file system)")) == \
        "-o out: cannot write there (Read-only file system)"
    assert setup_message(FileNotFoundError("input x.wav: no such file or folder")) == \
        "input x.wav: no such file or folder"


def test_error_log_appends_tracebacks(tmp_path):
    log = ErrorLog(tmp_path)
    try:
        {}["missing"]
    except KeyError as e:
        log.write("/in/a.wav", one_line(e), format_traceback(e))
    log.write("/in/b.wav", "AudioError: b", None)
    text = log.path.read_text()
    assert log.path == tmp_path / ".ripper-dist" / "errors.log"
    assert "/in/a.wav\nKeyError: 'missing'\nTraceback" in text and "/in/b.wav\nAudioError: b" in text
