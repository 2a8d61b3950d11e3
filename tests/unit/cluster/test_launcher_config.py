"""`LauncherConfig` rules and the Ray runtime environment derived from it."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from posttrain.cluster.ray_runtime import PROJECT_ROOT, import_paths, ray_address, worker_runtime_env
from posttrain.config.launcher import LauncherConfig


def test_more_than_one_worker_defaults_to_ray():
    assert LauncherConfig().backend == "local"
    assert LauncherConfig(num_workers=2).backend == "ray"
    cfg = LauncherConfig()
    cfg.num_workers = 4
    assert cfg.backend == "ray"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "local", "num_workers": 2}, "backend: local runs one rank in this process"),
        ({"address": "auto"}, "only used with launcher.backend: ray"),
        ({"master_port": 29500}, "only used with launcher.backend: ray"),
        ({"backend": "ray", "placement_strategy": "TIGHT"}, "PACK"),
        ({"backend": "ray", "master_port": 70000}, "less than or equal to 65535"),
    ],
)
def test_invalid_launcher_configs(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        LauncherConfig(**kwargs)


def test_ray_address_absent_means_a_fresh_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(LauncherConfig(backend="ray")) == "local"
    assert ray_address(LauncherConfig(backend="ray", address="auto")) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as under `ray job submit`
    assert ray_address(LauncherConfig(backend="ray")) == "10.0.0.1:6379"


def test_workers_import_what_the_driver_imports(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    paths = import_paths()
    assert paths[0] == str(PROJECT_ROOT) and "/opt/extra" in paths and os.getcwd() in paths
    assert len(paths) == len(set(paths))
    env = worker_runtime_env(LauncherConfig(backend="ray"), {"NCCL_DEBUG": "WARN"})
    assert env["env_vars"]["PYTHONPATH"].split(os.pathsep) == paths
    assert env["env_vars"]["NCCL_DEBUG"] == "WARN" and "working_dir" not in env
    assert env["env_vars"]["POSTTRAIN_DRIVER_CWD"] == os.getcwd()  # relative config paths
    shipped = worker_runtime_env(LauncherConfig(backend="ray", working_dir="."))
    assert shipped["working_dir"] == "." and ".venv" in shipped["excludes"]
    assert "POSTTRAIN_DRIVER_CWD" not in shipped["env_vars"]  # paths resolve in the upload
