"""Start ``world_size`` gloo processes on 127.0.0.1 once, run named scenarios in each, collect
what happened.

Each rank runs the scenarios in the order given and writes its outcome per scenario to
``outdir/rank{r}.json`` as it goes, so a hang still reports what finished. After each scenario
the ranks agree (one all_reduce) on whether anyone failed; a rank that failed half-way through
a scenario may have left collectives unmatched, and the group timeout turns the resulting hang
into an error instead of a stuck test run.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def _worker(rank: int, world_size: int, port: int, names: list[str], outdir: str) -> None:
    import torch.distributed as dist

    import dist_scenarios

    torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{rank}.json")
    results: dict[str, dict] = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        ctx = dist_scenarios.Context(rank=rank, world_size=world_size, tmpdir=outdir)
        for name in names:
            t0 = time.perf_counter()
            try:
                dist_scenarios.SCENARIOS[name](ctx)
                results[name] = {"ok": True}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            _write(path, results)
            flag = torch.tensor([0.0 if results[name]["ok"] else 1.0])
            try:
                dist.all_reduce(flag)
            except Exception:  # a rank is stuck in an unmatched collective: stop here
                results[name]["error"] = results[name].get("error", "") + "\n(ranks out of step after this)"
                _write(path, results)
                break
    finally:
        _write(path, results)
        dist.destroy_process_group()


def run_scenarios(names: list[str], outdir: str, world_size: int = 2, timeout_s: float = 300) -> list[dict]:
    """Run ``names`` in ``world_size`` fresh processes; per rank, {name: {"ok", "error"}}."""
    port = free_port()
    ctx = mp.start_processes(_worker, args=(world_size, port, names, outdir), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        pass  # reported through the results files
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(world_size):
        try:
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                out.append(json.load(f))
        except FileNotFoundError:
            out.append({})
    return out
