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
    # The rules `ray up` gives the group: its own (SSH from anywhere, all traffic within the group) plus the file's.
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules({"sg-cluster"}, config["provider"]["security_group"].get("IpPermissions"))
    from_outside = [(r["FromPort"], r["ToPort"], r["IpProtocol"].lower()) for r in rules if r.get("IpRanges")]
    assert from_outside == [(22, 22, "tcp")]  # only SSH, and once: AWS refuses a call that repeats a rule
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


def test_nodes_install_the_cluster_extra_with_rays_pin():
    """The nodes get Ray's dashboard and job server (ray[default], which README's `ray dashboard` / `ray job submit`
    need) and boto3 (the head's autoscaler), with the same Ray pin as the project."""
    import re
    import tomllib

    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray[")).split("==")[1]
    cluster = project["optional-dependencies"]["cluster"]
    assert f"ray[default]=={ray_pin}" in cluster and any(re.fullmatch(r"boto3==[\d.]+", d) for d in cluster)
    setup = yaml.safe_load((CLUSTER / "gpu.yaml").read_text())["setup_commands"]
    assert any(re.search(r"pip install .*lmd-ray\[cluster\]", c) for c in setup)
