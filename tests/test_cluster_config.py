"""cluster.yaml must pass the same validation `ray up` applies (schema shipped inside the ray package)."""
import copy
import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _config()
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    # workers get the runtime only (no torch); the head, which exports, gets the export extra
    assert not any("[export" in c for c in cfg["setup_commands"])
    assert any("[export]" in c for c in cfg["head_setup_commands"])
    # every node's Ray runs its workers at normal priority (Ray's default nice 15 yields to any background work)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_worker_niceness=0 " in c for c in starts), key


def test_every_node_gets_the_token_and_no_ray_starts_without_it():
    """Ray 2.60 token authentication: one token, copied from the `ray up` machine to ~/.ray/auth_token (mode 600) on
    every node, and RAY_AUTH_MODE=token on every `ray start` (a worker joins only with it; on the head it makes Ray
    refuse to start without the token instead of opening the dashboard on 0.0.0.0 to anyone). The venv is on PATH
    for `ray start`, so a job's `python jobs/separate.py` is the venv's."""
    cfg = _config()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for c in (c for c in cfg[key] if "ray start" in c):
            env = c.split("ray start")[0]
            assert "RAY_AUTH_MODE=token " in env and "PATH=$HOME/ripper-venv/bin:$PATH " in env, c
            assert "RAY_AUTH_TOKEN" not in c  # the token stays in its file, never on a command line
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=0.0.0.0" in head  # reachable for `ray job submit`, hence the token


def test_cluster_yaml_prepared_like_ray_up():
    validate_config(prepare_config(copy.deepcopy(_config())))
