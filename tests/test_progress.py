"""The progress bar over audio seconds: x-realtime in its postfix, and no overshoot past its total."""
import warnings

from ripper_dist.progress import Progress


def test_progress_grows_its_total_instead_of_overshooting():
    p = Progress(10.0, enabled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm warns (TqdmWarning) when n passes total
        p.update(6.0)
        p.update(4.0 + 1e-3)
        p.bar.refresh()
    assert p.bar.n == p.bar.total and abs(p.done - 10.001) < 1e-9
    assert "x realtime" in str(p.bar.postfix)
    p.close()


def test_an_unknown_total_grows_as_durations_are_learned():
    p = Progress(None, enabled=True)
    p.set_total(30.0)
    p.update(10.0)
    p.set_total(5.0)  # an estimate that shrank below what is done: never below the work done
    assert p.bar.total == 10.0
    p.close()
