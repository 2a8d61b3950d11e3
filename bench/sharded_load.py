"""Per-rank memory of sharded loading: SmolLM2 on 2 gloo ranks (FSDP2) vs a whole load on one.

Each rank is a torchrun-style child process. After imports, the process group and the mesh are
up, it resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), builds the model (meta ->
parallelise -> `load_sharded`, or `load_hf` for the whole-model row) and reports its peak RSS
growth (`VmHWM` - `VmRSS` before), together with the bytes of the parameters it holds. Growth
counts everything the process touched: its shards, transient slices and mapped checkpoint pages.

    .venv/bin/python bench/sharded_load.py [--model DIR_OR_BUNDLED_NAME] [--world 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(model_dir: str, mode: str) -> dict:
    """One rank: load and report (run under torchrun-style environment variables)."""
    import torch
    from torch.distributed.tensor import DTensor

    from posttrain.cluster.dist_env import destroy_distributed, init_distributed
    from posttrain.config.parallel import ParallelConfig
    from posttrain.models.hf import build_meta_model, load_hf, read_hf_config
    from posttrain.parallel.load import load_sharded
    from posttrain.parallel.mesh import build_mesh
    from posttrain.parallel.parallelize import parallelize_model

    torch.set_num_threads(1)
    env = init_distributed()
    cfg = ParallelConfig()
    mesh = build_mesh(cfg, env.world_size) if mode == "sharded" else None
    gc.collect()
    _reset_peak()
    start = _status_kib("VmRSS")
    # Warm-up: a one-layer model on meta runs the lazy, one-off initialisation (module imports,
    # first meta allocation) that does not depend on the model's size; reported separately.
    source, args = read_hf_config(model_dir)
    tiny = build_meta_model(replace(args, num_layers=1, layer_types=[]))
    if mesh is not None:
        parallelize_model(tiny, mesh, cfg)
    del tiny
    gc.collect()
    warm = _status_kib("VmHWM")
    _reset_peak()
    before = _status_kib("VmRSS")
    if mode == "sharded":
        model = parallelize_model(build_meta_model(args), mesh, cfg)
        load_sharded(model, source)
    else:
        model = load_hf(model_dir)
    with torch.no_grad():  # touch every weight, in case any is still a lazily mapped file page
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).sum()
    peak = _status_kib("VmHWM")
    held = sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters()
    )
    full = sum(p.numel() for p in model.parameters()) * 4  # fp32, a tied table counted once
    destroy_distributed()
    return {"rank": env.rank, "world": env.world_size, "mode": mode, "growth_bytes": (peak - before) * 1024,
            "warmup_bytes": (warm - start) * 1024, "held_bytes": held, "full_fp32_bytes": full}


def measure(model_dir: str | Path, world: int, mode: str = "sharded", timeout: float = 600) -> list[dict]:
    """Run `world` ranks of `worker` as child processes; their reports in rank order."""
    from posttrain.cluster.dist_env import find_free_port

    port = str(find_free_port("127.0.0.1"))
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model_dir), "--mode", mode]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rank failed ({proc.returncode}):\n{err[-4000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--mode", choices=("sharded", "whole"), default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model
    if not args.worker and not Path(model_dir).is_dir():
        sys.path.insert(0, str(ROOT))
        from posttrain.models.hub import import_model

        model_dir = str(import_model(model_dir))
    if args.worker:
        print(json.dumps(worker(model_dir, args.mode)))
        return

    rows = measure(model_dir, 1, "whole") + measure(model_dir, args.world, "sharded")
    mib = 2**20
    print(f"model: {model_dir}  full fp32 bytes: {rows[0]['full_fp32_bytes'] / mib:.1f} MiB")
    print(f"{'load':<23}{'rank':>5}{'held MiB':>10}{'growth MiB':>12}{'/ full':>8}{'+ warm-up MiB':>15}{'/ full':>8}")
    for r in rows:
        label = "load_hf (1 rank)" if r["mode"] == "whole" else f"load_sharded ({r['world']} ranks)"
        full = r["full_fp32_bytes"]
        cold = r["growth_bytes"] + r["warmup_bytes"]
        print(f"{label:<23}{r['rank']:>5}{r['held_bytes'] / mib:>10.1f}{r['growth_bytes'] / mib:>12.1f}"
              f"{r['growth_bytes'] / full:>8.1%}{cold / mib:>15.1f}{cold / full:>8.1%}")


if __name__ == "__main__":
    main()
