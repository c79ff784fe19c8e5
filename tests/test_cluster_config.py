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


def test_cluster_yaml_prepared_like_ray_up():
    validate_config(prepare_config(copy.deepcopy(_config())))
