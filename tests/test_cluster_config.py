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


def test_cluster_yaml_prepared_like_ray_up():
    validate_config(prepare_config(copy.deepcopy(_config())))


def test_schema_rejects_a_broken_config():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _config()
    cfg["provider"] = {"head_ip": "x"}  # no type
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted a provider without a type")
