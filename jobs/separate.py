"""Entrypoint for `ray job submit`: runs `ripper-dist separate` on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/separate.py /data/archive -o /data/stems -n htdemucs --device cuda

Inside a Ray job RAY_ADDRESS is set, so the driver joins the cluster instead of starting a local Ray; any other
`ripper-dist separate` option can follow.
"""
import os
import sys

from ripper_dist.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--address" not in argv:
        argv = ["--address", os.environ.get("RAY_ADDRESS", "auto")] + argv
    sys.exit(main(["separate", "--engine", "ray"] + argv))
