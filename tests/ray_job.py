"""Run a separation as a Ray job from Python with test behaviour injected (used by test_ray_pipeline in a child
process): `python tests/ray_job.py DELAY_S OUT ARGS...` separates like `ripper-dist separate ARGS -o OUT`, with each
model call slowed by DELAY_S so that a fault can be injected mid-run."""
import sys
import time

from ripper_dist.cli import build_parser, separate_options
from ripper_dist.ray_pipeline import onnx_runners, run_ray
from ripper_dist.separator import clean_leftovers, plan_job


class Slow:
    def __init__(self, runner, delay):
        self.runner, self.delay = runner, delay
        self.chunk_samples = runner.chunk_samples

    def __call__(self, batch):
        time.sleep(self.delay * len(batch))
        return self.runner(batch)


def slow_runners(delay):
    def make(graphs, device, threads, max_batch):
        return [Slow(r, delay) if r is not None else None for r in onnx_runners(graphs, device, threads, max_batch)]
    return make


if __name__ == "__main__":
    delay, out, argv = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    opts = separate_options(build_parser().parse_args(["separate", "-o", out, *argv]))
    job = plan_job(opts)
    clean_leftovers(job)
    rows = run_ray(job, make_runners=slow_runners(delay))
    sys.exit(1 if any(r["status"] == "failed" for r in rows) else 0)
