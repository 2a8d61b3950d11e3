"""Connecting the driver to Ray, and the runtime environment that lets actors import the project."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from posttrain.cluster.worker import DRIVER_CWD_VAR
from posttrain.config.launcher import LauncherConfig

logger = logging.getLogger("posttrain.cluster")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the `posttrain` package (a checkout or site-packages)."""


def import_paths() -> list[str]:
    """Directories the driver imports from that a worker on this machine must see too.

    The project root, the driver script's directory, the working directory and `PYTHONPATH`,
    in that order and without repeats. Site-packages need nothing: workers run the same Python.
    """
    paths = [str(PROJECT_ROOT)]
    if sys.path and sys.path[0]:
        paths.append(str(Path(sys.path[0]).resolve()))
    paths.append(os.getcwd())
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys(paths))


def worker_runtime_env(cfg: LauncherConfig, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The `runtime_env` every worker actor gets: `PYTHONPATH` and the driver's working directory,
    so relative paths in a config mean the same on every rank; or Ray's `working_dir` upload, where
    relative paths resolve inside the uploaded copy."""
    variables = {"PYTHONPATH": os.pathsep.join(import_paths())}
    runtime_env: dict[str, Any] = {"env_vars": variables}
    if cfg.working_dir is not None:
        runtime_env["working_dir"] = cfg.working_dir
        runtime_env["excludes"] = [".git", ".venv", "runs", "__pycache__"]
    else:
        variables[DRIVER_CWD_VAR] = os.getcwd()
    variables.update(env_vars or {})
    return runtime_env


def ray_address(cfg: LauncherConfig) -> str:
    """What `ray.init` is given: the configured address; `local` (a fresh instance) when absent,
    unless `RAY_ADDRESS` names a cluster (as `ray job submit` does for its entrypoints)."""
    if cfg.address is not None:
        return cfg.address
    return os.environ.get("RAY_ADDRESS") or "local"


def init_ray(cfg: LauncherConfig, **init_kwargs: Any) -> bool:
    """Connect to (or start) Ray for `cfg`; returns False when Ray was already up (reused as is).

    Extra keyword arguments go to `ray.init` (e.g. `num_cpus` for a local instance).
    """
    if ray.is_initialized():
        return False
    address = ray_address(cfg)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if address == "local":
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs)
    logger.info("connecting to Ray at %s", address)
    ray.init(**kwargs)
    return True


@contextmanager
def ray_session(cfg: LauncherConfig, **init_kwargs: Any) -> Iterator[None]:
    """Ray for the duration of a `with` block; shut down afterwards only if this block started it."""
    started = init_ray(cfg, **init_kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
