"""Every `ray up` YAML in cluster/ passes Ray's own schema and our security rules (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))


def test_there_is_a_gpu_cluster_config():
    assert CLUSTER / "gpu.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_own_validation(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # raises on any schema violation


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_only_ssh_is_open_and_no_credentials_are_in_the_file(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--ray-client-server-port" not in head
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "password", "RAY_AUTH_TOKEN="):
        assert secret.lower() not in text.lower()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_starts_ray_with_token_authentication(path):
    """RAY_AUTH_MODE=token on each `ray start`, the token file (not its value) copied to every node."""
    config = yaml.safe_load(path.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert config["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"


def test_gpu_workers_autoscale_from_zero_and_fit_max_workers():
    config = yaml.safe_load((CLUSTER / "gpu.yaml").read_text())
    gpu_types = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert {v["node_config"]["InstanceType"].split(".")[0] for v in gpu_types.values()} == {"g5", "p4d", "p5"}
    assert all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in gpu_types.values())
    assert sum(v["max_workers"] for v in gpu_types.values()) <= config["max_workers"]
    assert any("pip install" in c and "lmd-ray" in c for c in config["setup_commands"])
