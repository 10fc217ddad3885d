"""The benchmark grid: devices x dtypes x presets x optimizers x implementations.

:func:`run` returns a JSON-ready dict (see :func:`fusedopt.bench.report.write_results`):
``meta`` (environment, settings), ``bandwidth`` (one streaming reference per device) and
``results`` (one record per grid cell, including raw per-step timings in milliseconds).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from fusedopt.bench import sysinfo
from fusedopt.bench.optimizers import IMPLS, OPTIMIZERS, Unsupported, build_optimizer, fusedopt_classes
from fusedopt.bench.presets import get_preset, make_params
from fusedopt.bench.timing import capture_step, stream_bandwidth, synchronize, time_steps

__all__ = ["BenchConfig", "DTYPES", "DEFAULT_SKIPS", "run", "plan_cells"]

BUSY_WARN = 0.15  # other processes' CPU share above which CPU timings are flagged

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# (device type, preset, impl) -> why it is left out unless --impls names it explicitly.
DEFAULT_SKIPS = {
    ("cpu", "many-small", "torch-forloop"): (
        "skipped by default on CPU (10,000 Python-level per-tensor updates, ~0.1-0.4 s/step here, "
        "which only re-confirms torch-foreach's overhead story); pass --impls to include it"),
}


@dataclass
class BenchConfig:
    presets: list[str]
    devices: list[str]
    dtypes: list[str]
    optimizers: list[str]
    impls: list[str]
    impls_explicit: bool = False
    reps: int | None = None          # None: auto (time budget per cell)
    warmup: int = 2
    budget_s: float = 0.6            # auto reps: timed seconds per cell (CPU)
    min_reps: int = 3
    max_reps: int | None = None      # None: 15 on CPU, 100 on CUDA
    quick: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def plan_cells(cfg: BenchConfig) -> list[tuple[str, str, str, str, str]]:
    """Every (device, dtype, preset, optimizer, impl) the run will visit, in order."""
    cells = []
    for dev in cfg.devices:
        for dt in cfg.dtypes:
            for pre in cfg.presets:
                for opt in cfg.optimizers:
                    for impl in cfg.impls:
                        if IMPLS[impl].cuda_only and not dev.startswith("cuda"):
                            continue
                        cells.append((dev, dt, pre, opt, impl))
    return cells


def _free(device: torch.device, full: bool = True) -> None:
    if full:
        gc.collect()  # ~70 ms with torch loaded: skipped between --quick cells
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_cell(cfg: BenchConfig, device: torch.device, params, opt_name: str, impl_name: str) -> dict:
    impl, opt = IMPLS[impl_name], OPTIMIZERS[opt_name]
    rec: dict = {"status": "ok", "reason": ""}
    optimizer = step = None
    try:
        optimizer = build_optimizer(impl, opt, params)
        step = optimizer.step
        if impl.graph:
            step = capture_step(optimizer.step, device, warmup=max(1, cfg.warmup))
        max_reps = cfg.max_reps or (100 if device.type == "cuda" else 15)
        t0 = time.perf_counter()
        times = time_steps(step, device, warmup=cfg.warmup, reps=cfg.reps, min_reps=cfg.min_reps,
                           max_reps=max_reps, budget_s=cfg.budget_s)
        rec["wall_s"] = time.perf_counter() - t0
        rec["times_ms"] = times
        rec["median_ms"] = statistics.median(times)
        rec["min_ms"] = min(times)
        if len(times) > 1:
            q = statistics.quantiles(times, n=4, method="inclusive")
            rec["iqr_ms"] = [q[0], q[2]]
    except Unsupported as e:
        rec.update(status="n/a", reason=str(e))
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="n/a", reason=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # any torch variant refusing a dtype/device etc.: record, don't crash
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rec.update(status="n/a", reason=f"{type(e).__name__}: {msg}"[:300])
        rec["traceback"] = traceback.format_exc(limit=3)
    finally:
        # drop the optimizer state and any CUDA graph (its private memory pool) before the next cell
        optimizer = step = None
        synchronize(device)
        _free(device, full=not cfg.quick or device.type == "cuda")
    return rec


def run(cfg: BenchConfig, progress: bool = True, log=print) -> dict:
    """Run the grid described by ``cfg``; returns the results dict (no printing but ``log``)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    _classes, fusedopt_desc, fusedopt_reason = fusedopt_classes()
    env = sysinfo.environment()
    out: dict = {
        "meta": {
            **env,
            "fusedopt_impl": fusedopt_desc,
            "fusedopt_unavailable_reason": fusedopt_reason or None,
            "config": {k: v for k, v in asdict(cfg).items()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "devices": {},
        "presets": {},
        "results": [],
        "notes": [],
    }
    cells = plan_cells(cfg)
    bar = tqdm(total=len(cells), desc="fusedopt-bench", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for dev_str in cfg.devices:
            device = torch.device(dev_str)
            bar.set_postfix_str(f"{dev_str}: streaming bandwidth")
            bw_nbytes = (64 << 20) if cfg.quick else None
            bw_samples = [stream_bandwidth(device, nbytes=bw_nbytes)]
            bw = dict(bw_samples[0])
            out["devices"][dev_str] = {"name": sysinfo.device_name(device), "bandwidth": bw,
                                       "bandwidth_samples": bw_samples}
            first_preset = True
            for dt_name in cfg.dtypes:
                dtype = DTYPES[dt_name]
                es = torch.empty((), dtype=dtype).element_size()
                for pre_name in cfg.presets:
                    if not first_preset:
                        # memory bandwidth drifts on shared machines: re-measure before every
                        # preset and use the best median seen on this device as the reference
                        bar.set_postfix_str(f"{dev_str}: streaming bandwidth")
                        bw_samples.append(stream_bandwidth(device, nbytes=bw_nbytes))
                    first_preset = False
                    preset = get_preset(pre_name, device, cfg.quick)
                    out["presets"][f"{dev_str}/{pre_name}"] = {
                        "note": preset.note, "num_tensors": preset.num_tensors, "numel": preset.numel}
                    bar.set_postfix_str(f"{dev_str} {dt_name} {pre_name}: making params")
                    params = None
                    try:
                        params = make_params(preset.shapes, dtype, device, seed=cfg.seed)
                        make_err = None
                    except Exception as e:  # e.g. out of memory for this dtype
                        make_err = f"cannot allocate preset: {type(e).__name__}: {str(e).splitlines()[0]}"
                    for opt_name in cfg.optimizers:
                        opt = OPTIMIZERS[opt_name]
                        nbytes = preset.numel * opt.bytes_per_element(es)
                        for impl_name in cfg.impls:
                            if IMPLS[impl_name].cuda_only and device.type != "cuda":
                                continue
                            bar.set_postfix_str(f"{dev_str} {dt_name} {pre_name} {opt_name} {impl_name}")
                            base = {
                                "device": dev_str, "dtype": dt_name, "preset": pre_name, "optimizer": opt_name,
                                "impl": impl_name, "num_tensors": preset.num_tensors, "numel": preset.numel,
                                "bytes_per_step": nbytes, "bytes_per_element": opt.bytes_per_element(es),
                                "warmup": cfg.warmup,
                            }
                            skip = DEFAULT_SKIPS.get((device.type, pre_name, impl_name))
                            if make_err:
                                rec = {"status": "n/a", "reason": make_err}
                            elif skip and not cfg.impls_explicit and not cfg.quick:
                                rec = {"status": "skipped", "reason": skip}
                            else:
                                rec = _measure_cell(cfg, device, params, opt_name, impl_name)
                            if rec.get("median_ms"):
                                rec["gbps"] = nbytes / (rec["median_ms"] / 1e3) / 1e9
                            rec["stream_sample"] = len(bw_samples) - 1
                            out["results"].append({**base, **rec})
                            bar.update(1)
                    del params
                    _free(device)
            best = max(bw_samples, key=lambda b: b["gbps"])
            bw.update(gbps=best["gbps"], gbps_max=max(b["gbps_max"] for b in bw_samples),
                      times_ms=best["times_ms"], samples_gbps=[b["gbps"] for b in bw_samples],
                      method=f"{best['method']}; best median of {len(bw_samples)} measurements, "
                             "one before each preset")
            for r in out["results"]:
                if r["device"] == dev_str and r.get("gbps"):
                    r["pct_of_stream"] = 100.0 * r["gbps"] / bw["gbps"]
    finally:
        bar.close()
    _add_speedups(out["results"])
    for (dtype_, pre, impl), why in DEFAULT_SKIPS.items():
        if any(r["status"] == "skipped" and r["preset"] == pre and r["impl"] == impl for r in out["results"]):
            out["notes"].append(f"{impl} on {pre} ({dtype_}): {why}")
    if fusedopt_reason:
        out["notes"].append(f"fusedopt rows are n/a: {fusedopt_reason}")
    elif fusedopt_desc.startswith("STAND-IN"):
        out["notes"].append(f"WARNING: the 'fusedopt' rows are a {fusedopt_desc}, not fusedopt")
    busy_end = sysinfo.other_cpu_busy()
    out["meta"]["other_cpu_busy_at_end"] = busy_end
    if hasattr(os, "getloadavg"):
        out["meta"]["loadavg_end"] = list(os.getloadavg())
    busy = [b for b in (env.get("other_cpu_busy_at_start"), busy_end) if b is not None]
    if "cpu" in cfg.devices and busy and max(busy) > BUSY_WARN:
        out["notes"].append(
            f"WARNING: other processes used {max(busy):.0%} of the CPU around this run (sampled at start "
            "and end): CPU timings, torch's multi-threaded kernels especially, are unreliable")
    out["meta"]["wall_s"] = time.perf_counter() - t_start
    return out


def _add_speedups(results: list[dict]) -> None:
    """speedup = t(this torch impl) / t(fusedopt); graph rows compare with fusedopt-graph."""
    ref = {}
    for r in results:
        if r["impl"] in ("fusedopt", "fusedopt-graph") and r["status"] == "ok":
            ref[(r["device"], r["dtype"], r["preset"], r["optimizer"], r["impl"])] = r["median_ms"]
    for r in results:
        if r["impl"].startswith("fusedopt") or r["status"] != "ok":
            continue
        which = "fusedopt-graph" if r["impl"].endswith("-graph") else "fusedopt"
        t = ref.get((r["device"], r["dtype"], r["preset"], r["optimizer"], which))
        if t:
            r["fusedopt_speedup"] = r["median_ms"] / t
            r["speedup_vs"] = which
