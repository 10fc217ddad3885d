"""``python -m fusedopt.bench --distributed fsdp2 --nproc 2``: the optimizer step of an
FSDP2-sharded model, fusedopt against torch.optim's for-loop, foreach and fused implementations
stepping the same DTensor params.

``nproc`` processes are spawned (gloo over 127.0.0.1 on the CPU, one intra-op thread per rank;
NCCL with one GPU per rank when there are enough GPUs). Each builds the same model from a
preset's shapes, shards it with ``torch.distributed.fsdp.fully_shard`` (every param a DTensor,
``Shard(0)`` over the ranks) and makes its grads with one forward and backward pass, so they are
the grads FSDP2 makes. Per optimizer, every implementation then steps those params; as in the
single-process benchmark, implementations are timed round-robin (``--rounds`` passes), all ranks
entering each implementation's timed steps together.

Measured per rank and implementation:

- ``ms/step``: ``optimizer.step()`` on the DTensor params (synchronized on a GPU);
- ``plain ms/step``: the same implementation stepping the same local shards as plain tensors
  (aliases of their memory): the cost of the update without DTensor;
- ``host ms/step``: how long the step keeps the host busy beyond the update math. On a GPU, the
  time until ``step()`` returns (the kernels run asynchronously); on the CPU, where the math runs
  on the host as well, ``ms/step`` minus ``plain ms/step``, i.e. the DTensor overhead;
- ``1st step ms``: the first step on the DTensors, state creation included; for torch it also
  pays DTensor's sharding propagation with a cold cache.

Tables show the slowest rank (the others wait for it at the next collective); ``--out`` writes
every rank's timings to results.json and the table to results.md.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fusedopt.bench import sysinfo
from fusedopt.bench.optimizers import IMPLS, OPTIMIZERS, build_optimizer, fusedopt_classes
from fusedopt.bench.presets import get_preset
from fusedopt.bench.timing import synchronize

__all__ = ["KINDS", "DEFAULT_PRESETS", "DEFAULT_OPTIMIZERS", "run", "format_table", "format_markdown"]

KINDS = ("fsdp2",)
# many-4k is the case where DTensor dispatch dominates torch's step, but torch's first steps on
# its 1,000 DTensors take about a minute of sharding propagation (foreach ~50 s, fused ~15 s on
# a 2-core CPU), so the default run, meant to take under a minute, leaves it out.
DEFAULT_PRESETS = ("gpt2-small",)
DEFAULT_OPTIMIZERS = ("adamw",)
VARIANTS = ("dtensor", "plain")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ShapesModel(nn.Module):
    """One parameter per preset shape; ``forward`` returns 0.5 * sum(p**2), whose grads are the
    params' own values (random N(0, 0.02^2)), so making the grads needs no more memory."""

    def __init__(self, shapes, dtype: torch.dtype, device: torch.device, seed: int):
        super().__init__()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.ps = nn.ParameterList(
            nn.Parameter(torch.empty(s, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen))
            for s in shapes)

    def forward(self) -> torch.Tensor:
        return sum(p.float().square().sum() for p in self.ps) * 0.5


def _plain_aliases(params: list) -> list[torch.Tensor]:
    """Each DTensor param's local shard as a plain leaf tensor sharing its memory, with its
    grad's local shard as ``.grad``."""
    out = []
    for p in params:
        a = p.to_local().detach().requires_grad_(True)
        a.grad = p.grad.to_local()
        out.append(a)
    return out


def _time(step, device: torch.device, reps: int) -> tuple[list[float], list[float]]:
    """(step ms, ms until step() returned) for ``reps`` calls."""
    total, host = [], []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            synchronize(device)
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
    finally:
        if was:
            gc.enable()
    return total, host


def _rank_main(rank: int, cfg: dict, port: int, outdir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = cfg["nproc"]
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh(device.type, (world,))

    def agree_max(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    records: list[dict] = []
    try:
        for pre_name in cfg["presets"]:
            preset = get_preset(pre_name, device, cfg["quick"])
            model = _ShapesModel(preset.shapes, getattr(torch, cfg["dtype"]), device, cfg["seed"])
            fully_shard(model, mesh=mesh)
            model().backward()
            params = list(model.parameters())
            local_numel = sum(p.to_local().numel() for p in params)
            plain = _plain_aliases(params)
            for opt_name in cfg["optimizers"]:
                records += _measure(cfg, device, dist, agree_max, params, plain, pre_name, preset, opt_name, local_numel)
            del model, params, plain
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)
        dist.destroy_process_group()


def _measure(cfg, device, dist, agree_max, params, plain, pre_name, preset, opt_name, local_numel) -> list[dict]:
    opt = OPTIMIZERS[opt_name]
    recs: dict[str, dict] = {}
    live: dict[tuple[str, str], dict] = {}

    def start(impl: str, variant: str) -> None:
        """Build, warm up, estimate one step's time; on failure (n/a) record why."""
        key = (impl, variant)
        try:
            o = build_optimizer(IMPLS[impl], opt, params if variant == "dtensor" else plain)
            first = None
            for _ in range(max(1, cfg["warmup"])):
                t, _h = _time(o.step, device, 1)
                first = t[0] if first is None else first
            live[key] = {"opt": o, "est": t[0], "first": first, "times": [], "host": []}
        except Exception as e:  # e.g. an implementation that does not take DTensors or this dtype
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            recs.setdefault(impl, {})[variant] = {"status": "n/a", "reason": f"{type(e).__name__}: {msg}"[:300]}

    def timed_round(keys, reps: int) -> None:
        for key in keys:
            dist.barrier()
            t, h = _time(live[key]["opt"].step, device, reps)
            live[key]["times"] += t
            live[key]["host"] += h

    keys = [(impl, v) for impl in cfg["impls"] for v in VARIANTS]
    groups = [keys] if cfg["interleave"] else [[(impl, v) for v in VARIANTS] for impl in cfg["impls"]]
    for group in groups:
        for key in group:
            start(*key)
        # the same implementations and number of timed steps on every rank (the slowest rank's
        # estimate), or the ranks' barriers would not pair up
        for key in group:
            if agree_max(0.0 if key in live else 1.0) and key in live:
                live.pop(key)
                recs.setdefault(key[0], {})[key[1]] = {"status": "n/a", "reason": "failed on another rank"}
        mine = [k for k in group if k in live]
        for key in mine:
            est = agree_max(live[key]["est"])
            reps = cfg["reps"] or max(cfg["min_reps"], min(cfg["max_reps"], math.ceil(cfg["budget_s"] / max(est / 1e3, 1e-6))))
            live[key]["reps"] = _split(reps, cfg["rounds"])
        for r in range(cfg["rounds"]):
            for key in mine:
                if r < len(live[key]["reps"]):
                    timed_round([key], live[key]["reps"][r])
        for key in mine:
            lv = live.pop(key)
            recs.setdefault(key[0], {})[key[1]] = {
                "status": "ok", "times_ms": lv["times"], "host_times_ms": lv["host"],
                "median_ms": statistics.median(lv["times"]), "host_median_ms": statistics.median(lv["host"]),
                "first_step_ms": lv["first"]}
            lv["opt"] = None
        gc.collect()
    out = []
    for impl in cfg["impls"]:
        out.append({"preset": pre_name, "optimizer": opt_name, "impl": impl, "num_tensors": preset.num_tensors,
                    "numel": preset.numel, "local_numel": local_numel, **recs.get(impl, {})})
    return out


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _summarize(per_rank: list[list[dict]], device_type: str) -> list[dict]:
    """One row per (preset, optimizer, impl): the slowest rank's numbers, every rank's kept."""
    rows = []
    for recs in zip(*per_rank):
        base = {k: recs[0][k] for k in ("preset", "optimizer", "impl", "num_tensors", "numel")}
        base["local_numel"] = [r["local_numel"] for r in recs]
        base["ranks"] = [{v: r.get(v) for v in VARIANTS} for r in recs]
        dt = [r.get("dtensor") or {"status": "n/a", "reason": "not run"} for r in recs]
        if any(d["status"] != "ok" for d in dt):
            bad = next(d for d in dt if d["status"] != "ok")
            rows.append({**base, "status": "n/a", "reason": bad.get("reason", "")})
            continue
        slow = max(range(len(recs)), key=lambda i: dt[i]["median_ms"])
        row = {**base, "status": "ok", "slowest_rank": slow, "median_ms": dt[slow]["median_ms"],
               "first_step_ms": max(d["first_step_ms"] for d in dt)}
        pl = recs[slow].get("plain") or {}
        if pl.get("status") == "ok":
            row["plain_median_ms"] = pl["median_ms"]
        if device_type == "cuda":
            row["host_ms"] = dt[slow]["host_median_ms"]
        elif "plain_median_ms" in row:
            row["host_ms"] = max(0.0, row["median_ms"] - row["plain_median_ms"])
        rows.append(row)
    ref = {(r["preset"], r["optimizer"]): r["median_ms"] for r in rows
           if r["impl"] == "fusedopt" and r["status"] == "ok"}
    for r in rows:
        t = ref.get((r["preset"], r["optimizer"]))
        if r["status"] == "ok" and r["impl"] != "fusedopt" and t:
            r["fusedopt_speedup"] = r["median_ms"] / t
    return rows


def run(kind: str = "fsdp2", nproc: int = 2, presets=DEFAULT_PRESETS, optimizers=DEFAULT_OPTIMIZERS,
        impls=("fusedopt", "torch-forloop", "torch-foreach", "torch-fused"), dtype: str = "float32",
        device: str | None = None, quick: bool = False, warmup: int = 2, reps: int | None = None,
        budget_s: float = 0.6, rounds: int = 3, interleave: bool = True, seed: int = 0,
        timeout_s: float = 3600) -> dict:
    """Spawn ``nproc`` ranks, measure, return the results dict (``meta``, ``results``)."""
    import torch.multiprocessing as mp

    if kind not in KINDS:
        raise ValueError(f"unknown distributed kind {kind!r}; choose from {', '.join(KINDS)}")
    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        device = "cuda" if n_gpu >= nproc else "cpu"
    if device == "cuda" and n_gpu < nproc:
        raise ValueError(f"--nproc {nproc} on CUDA needs one GPU per rank, {n_gpu} visible")
    cfg = dict(kind=kind, nproc=nproc, presets=list(presets), optimizers=list(optimizers), impls=list(impls),
               dtype=dtype, device=device, quick=quick, warmup=warmup, reps=reps, budget_s=budget_s,
               rounds=max(1, rounds), interleave=interleave, seed=seed, min_reps=3,
               max_reps=100 if device == "cuda" else 15)
    if quick:
        cfg.update(warmup=min(warmup, 1), reps=reps or 3)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fusedopt-bench-dist-") as outdir:
        ctx = mp.start_processes(_rank_main, args=(cfg, free_port(), outdir), nprocs=nproc, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {nproc} ranks did not finish in {timeout_s:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        per_rank = []
        for r in range(nproc):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    _cls, fusedopt_desc, _reason = fusedopt_classes()
    env = sysinfo.environment()
    return {
        "meta": {**env, "distributed": kind, "nproc": nproc, "device": device,
                 "backend": "nccl" if device == "cuda" else "gloo",
                 "device_name": sysinfo.device_name(torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")),
                 "threads_per_rank": 1 if device == "cpu" else None, "fusedopt_impl": fusedopt_desc,
                 "config": cfg, "wall_s": time.perf_counter() - t0},
        "results": _summarize(per_rank, device),
    }


# -- reporting -----------------------------------------------------------------------------------

_COLS = ("preset", "optimizer", "impl", "ms/step", "host ms/step", "plain ms/step", "fusedopt speedup",
         "1st step ms")


def _fmt(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["preset"], r["optimizer"], r["impl"], "n/a", "", "", "", ""]
    sp = r.get("fusedopt_speedup")
    return [r["preset"], r["optimizer"], r["impl"], _fmt(r["median_ms"]), _fmt(r.get("host_ms")),
            _fmt(r.get("plain_median_ms")), f"{sp:.2f}x" if sp else "(ref)" if r["impl"] == "fusedopt" else "",
            _fmt(r["first_step_ms"])]


def _header(res: dict) -> str:
    m = res["meta"]
    threads = f", {m['threads_per_rank']} thread per rank" if m.get("threads_per_rank") else ""
    return (f"{m['distributed']}: {m['nproc']} ranks, {m['backend']} on {m['device']} [{m['device_name']}]"
            f"{threads}, {m['config']['dtype']}")


def _notes(res: dict) -> list[str]:
    m = res["meta"]
    lines = []
    for r in res["results"]:
        if r["impl"] == res["meta"]["config"]["impls"][0]:
            lines.append(f"{r['preset']}: {r['num_tensors']:,} tensors, {r['numel']:,} elements, per rank "
                         + " / ".join(f"{n:,}" for n in r["local_numel"]))
    host = ("the time until step() returned (the kernels run asynchronously)" if m["device"] == "cuda" else
            "ms/step minus plain ms/step: what DTensor adds to the step on the host")
    lines.append("ms/step: median optimizer.step() on the FSDP2 DTensor params, slowest rank. plain ms/step: the "
                 "same implementation on the same local shards as plain tensors. host ms/step: " + host + ". "
                 "fusedopt speedup = t(torch variant) / t(fusedopt), on the DTensors. 1st step ms: the first "
                 "step on the DTensors (state creation, and for torch DTensor's sharding propagation, whose cache "
                 "is cold), slowest rank.")
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"n/a: {r['preset']}/{r['optimizer']}/{r['impl']}: {r.get('reason', '')}")
    lines.append(f"torch {m.get('torch')}, {m.get('fusedopt_impl')}, commit "
                 f"{(m.get('git') or {}).get('commit') or 'n/a'}; wall time {m['wall_s']:.0f} s")
    return lines


def format_table(res: dict) -> str:
    rows = [list(_COLS)] + [_row(r) for r in res["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLS))]

    def fmt(row):
        return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = ["", _header(res), fmt(rows[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(row) for row in rows[1:]]
    return "\n".join(out + [""] + _notes(res))


def format_markdown(res: dict) -> str:
    lines = ["# fusedopt distributed benchmark", "", f"{_header(res)}", ""]
    lines.append("| " + " | ".join(_COLS) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|")
    lines += ["| " + " | ".join(_row(r)) + " |" for r in res["results"]]
    lines += ["", "## Notes", ""] + [f"- {x}" for x in _notes(res)]
    return "\n".join(lines) + "\n"


def write_results(res: dict, out_dir: str | Path) -> dict[str, Path]:
    from fusedopt.bench.report import _jsonable

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(res), indent=1) + "\n")
    paths["md"].write_text(format_markdown(res))
    return paths
