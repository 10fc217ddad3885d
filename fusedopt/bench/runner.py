"""The benchmark grid: devices x dtypes x presets x optimizers x implementations.

:func:`run` returns a JSON-ready dict (see :func:`fusedopt.bench.report.write_results`):
``meta`` (environment, settings), ``devices`` (name and streaming reference per device),
``presets``, ``results`` (one record per grid cell, with the raw per-step timings in ms) and
``notes``.

Interleaving. On a shared machine memory bandwidth drifts by tens of percent over a minute
(measured here: 30-60 GB/s on the same VM within one run), which would bias whichever
implementation happened to run during a slow spell. So on the CPU, for each (preset,
optimizer), every implementation is constructed and warmed up, and then the timed steps are
taken in ``rounds`` round-robin passes (fusedopt, torch-forloop, torch-foreach, torch-fused,
fusedopt, ...), with a streaming-reference sample at the start of each round. Drift then hits
all implementations and the reference alike. This keeps all their optimizer states alive at
once (4 x the state of one), which is fine for the CPU presets; on a GPU, where the presets
are sized to the memory and the clocks are steady, implementations run one after the other
(``interleave=False``).

Per-preset defaults. A preset may bring its own dtypes, optimizers, implementations and
precision variants (``fusedopt.bench.presets.PRESET_DEFAULTS``: the ``mixed`` preset is bf16,
Adam and SGD, every fusedopt precision option): they apply where the config does not set that
field explicitly (``*_explicit`` / ``precisions``), so ``--presets mixed gpt2-small`` runs the
first in bf16 with its variants and the second with the global defaults.

Precision variants. ``precisions`` expands the ``fusedopt`` implementation into one row per
option (``fusedopt:master`` ...); each row's GB/s counts the bytes that option moves
(bytes_model), and every row gets ``speedup_vs_torch_fused`` = t(torch-fused) / t(row) where
a torch-fused row exists.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from fusedopt.bench import sysinfo
from fusedopt.bench.optimizers import (OPTIMIZERS, PRECISIONS, Unsupported, build_optimizer, fusedopt_classes,
                                       get_impl, precision_impl_name)
from fusedopt.bench.presets import PRESET_DEFAULTS, get_preset, make_params
from fusedopt.bench.timing import StreamReference, capture_step, synchronize, time_steps

__all__ = ["BenchConfig", "DTYPES", "DEFAULT_SKIPS", "run", "plan_cells", "preset_plan", "expand_precisions"]

BUSY_WARN = 0.15  # other processes' CPU share above which CPU timings are flagged

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# (device type, preset, impl) -> why it is left out unless --impls names it explicitly.
DEFAULT_SKIPS = {
    ("cpu", "many-small", "torch-forloop"): (
        "skipped by default on CPU to keep the default run under two minutes (10,000 per-tensor "
        "updates from Python: ~0.1 s/step for SGD, ~0.35 s/step for Adam on a 2-core VM); "
        "pass --impls to include it"),
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
    rounds: int = 3                  # round-robin passes over the implementations (per cell: min(rounds, reps))
    interleave: bool | None = None   # None: True on CPU, False on CUDA
    quick: bool = False
    seed: int = 0
    dtypes_explicit: bool = False       # False: a preset's own dtypes (PRESET_DEFAULTS) win
    optimizers_explicit: bool = False   # likewise for optimizers
    precisions: list[str] | None = None  # fusedopt precision variants (None: the preset's, else none)
    extra: dict = field(default_factory=dict)


def expand_precisions(impls: list[str], precisions) -> list[str]:
    """``impls`` with the fusedopt row followed by one ``fusedopt:<option>`` row per precision
    option ("none" is the plain fusedopt row itself)."""
    extra = [precision_impl_name(p) for p in (precisions or ()) if p != "none"]
    for p in precisions or ():
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision option {p!r}; choose from {', '.join(PRECISIONS)}")
    if not extra:
        return list(impls)
    out = list(impls)
    at = out.index("fusedopt") + 1 if "fusedopt" in out else 0
    out[at:at] = extra
    return list(dict.fromkeys(out))


def preset_plan(cfg: BenchConfig, preset: str) -> tuple[list[str], list[str], list[str]]:
    """(dtypes, optimizers, impls) for ``preset``: the config's, or the preset's own defaults
    where the config does not set them explicitly."""
    own = PRESET_DEFAULTS.get(preset, {})
    dtypes = list(own["dtypes"]) if "dtypes" in own and not cfg.dtypes_explicit else list(cfg.dtypes)
    opts = list(own["optimizers"]) if "optimizers" in own and not cfg.optimizers_explicit else list(cfg.optimizers)
    impls = list(own["impls"]) if "impls" in own and not cfg.impls_explicit else list(cfg.impls)
    precisions = cfg.precisions if cfg.precisions is not None else own.get("precisions")
    return dtypes, opts, expand_precisions(impls, precisions)


def _dtype_order(cfg: BenchConfig) -> list[str]:
    out: list[str] = []
    for pre in cfg.presets:
        out += preset_plan(cfg, pre)[0]
    return list(dict.fromkeys(out))


def _has_row(cfg: BenchConfig, impl: str, device_type: str, opt: str) -> bool:
    """Whether ``impl`` gets a row for ``opt`` on a device of ``device_type``. By default a CUDA
    graph variant is left out on the CPU, and torch's rows of an optimizer torch.optim lacks
    (Lion); named in --impls, they get an n/a row saying why."""
    if cfg.impls_explicit:
        return True
    i = get_impl(impl)
    return not (i.cuda_only and device_type != "cuda") and (OPTIMIZERS[opt].has_torch or i.is_fusedopt)


def plan_cells(cfg: BenchConfig) -> list[tuple[str, str, str, str, str]]:
    """Every (device, dtype, preset, optimizer, impl) the run will visit, in order."""
    cells = []
    for dev in cfg.devices:
        for dt in _dtype_order(cfg):
            for pre in cfg.presets:
                dtypes, opts, impls = preset_plan(cfg, pre)
                if dt not in dtypes:
                    continue
                for opt in opts:
                    for impl in impls:
                        if _has_row(cfg, impl, torch.device(dev).type, opt):
                            cells.append((dev, dt, pre, opt, impl))
    return cells


def _free(device: torch.device, full: bool = True) -> None:
    if full:
        gc.collect()  # ~70 ms with torch loaded: skipped in --quick runs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive counts (fewer parts if total < parts)."""
    parts = max(1, min(parts, total))
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _na(e: BaseException) -> dict:
    if isinstance(e, Unsupported):
        return {"status": "n/a", "reason": str(e)}
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"status": "n/a", "reason": f"out of memory: {msg}"[:300]}
    return {"status": "n/a", "reason": f"{type(e).__name__}: {msg}"[:300],
            "traceback": traceback.format_exc(limit=3)}


class _Live:
    """One implementation being measured: its optimizer, step callable and timings so far."""

    def __init__(self, cfg: BenchConfig, device: torch.device, params, opt_name: str, impl_name: str):
        self.impl = get_impl(impl_name)
        self.optimizer = build_optimizer(self.impl, OPTIMIZERS[opt_name], params)
        self.step = self.optimizer.step
        if self.impl.graph:
            self.step = capture_step(self.optimizer.step, device, warmup=max(1, cfg.warmup))
        # untimed warm-up; the last one estimates the step time for the auto rep count
        t_est = None
        for _ in range(cfg.warmup):
            synchronize(device)
            t0 = time.perf_counter()
            self.step()
            synchronize(device)
            t_est = time.perf_counter() - t0
        self.times: list[float] = []
        if cfg.reps is not None:
            total = cfg.reps
        else:
            if t_est is None:  # --warmup 0: the first timed step is the estimate
                self.times += time_steps(self.step, device, warmup=0, reps=1)
                t_est = self.times[0] / 1e3
            max_reps = cfg.max_reps or (100 if device.type == "cuda" else 15)
            total = max(cfg.min_reps, min(max_reps, math.ceil(cfg.budget_s / max(t_est, 1e-6))))
            total = max(total - len(self.times), 1)
        self.per_round = _split(total, cfg.rounds if _interleaving(cfg, device) else 1)

    def close(self) -> None:
        self.optimizer = self.step = None


def _interleaving(cfg: BenchConfig, device: torch.device) -> bool:
    return cfg.interleave if cfg.interleave is not None else device.type == "cpu"


def _measure_group(cfg: BenchConfig, device: torch.device, params, opt_name: str, impl_names: list[str],
                   stream: StreamReference, stream_samples: list[dict], bar) -> dict[str, dict]:
    """Measure ``impl_names`` for one (preset, optimizer), round-robin; returns impl -> record."""
    recs: dict[str, dict] = {}
    live: dict[str, _Live] = {}
    for name in impl_names:
        bar.set_postfix_str(f"{device} {opt_name} {name}: warm-up")
        try:
            live[name] = _Live(cfg, device, params, opt_name, name)
        except Exception as e:  # unsupported dtype/device, OOM, capture failure: n/a, don't crash
            recs[name] = _na(e)
            synchronize(device)
    t0 = time.perf_counter()
    n_rounds = max((len(lv.per_round) for lv in live.values()), default=0)
    local_samples: list[float] = []
    for rnd in range(n_rounds):
        sample = stream.measure(reps=5 if device.type == "cpu" else 10)
        sample["round"] = rnd
        stream_samples.append(sample)
        local_samples.append(sample["gbps"])
        for name, lv in list(live.items()):
            if rnd >= len(lv.per_round):
                continue
            bar.set_postfix_str(f"{device} {opt_name} {name}: round {rnd + 1}/{n_rounds}")
            try:
                lv.times += time_steps(lv.step, device, warmup=0, reps=lv.per_round[rnd])
            except Exception as e:
                recs[name] = _na(e)
                live.pop(name).close()
    for name, lv in live.items():
        times = lv.times
        rec = {"status": "ok", "reason": "", "times_ms": times, "median_ms": statistics.median(times),
               "min_ms": min(times), "rounds": len(lv.per_round),
               "stream_gbps_during": statistics.median(local_samples)}
        if len(times) > 1:
            q = statistics.quantiles(times, n=4, method="inclusive")
            rec["iqr_ms"] = [q[0], q[2]]
        recs[name] = rec
        lv.close()
    live.clear()
    synchronize(device)
    _free(device, full=not cfg.quick or device.type == "cuda")
    for rec in recs.values():
        rec["group_wall_s"] = time.perf_counter() - t0
    return recs


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the grid described by ``cfg`` and return the results dict."""
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
            stream = StreamReference(device, (64 << 20) if cfg.quick else None)
            samples = [stream.measure(reps=10, warmup=3)]
            interleave = _interleaving(cfg, device)
            out["devices"][dev_str] = info = {"name": sysinfo.device_name(device), "interleaved": interleave}
            for dt_name in _dtype_order(cfg):
                dtype = DTYPES[dt_name]
                es = torch.empty((), dtype=dtype).element_size()
                for pre_name in cfg.presets:
                    pre_dtypes, pre_opts, pre_impls = preset_plan(cfg, pre_name)
                    if dt_name not in pre_dtypes:
                        continue
                    preset = get_preset(pre_name, device, cfg.quick)
                    out["presets"][f"{dev_str}/{pre_name}"] = {
                        "note": preset.note, "num_tensors": preset.num_tensors, "numel": preset.numel}
                    bar.set_postfix_str(f"{dev_str} {dt_name} {pre_name}: making params")
                    params, make_err = None, None
                    try:
                        params = make_params(preset.shapes, dtype, device, seed=cfg.seed)
                    except Exception as e:  # e.g. out of memory for this dtype
                        make_err = f"cannot allocate preset: {type(e).__name__}: {str(e).splitlines()[0]}"
                    for opt_name in pre_opts:
                        opt = OPTIMIZERS[opt_name]
                        impls = [i for i in pre_impls if _has_row(cfg, i, device.type, opt_name)]
                        recs: dict[str, dict] = {}
                        todo = []
                        for name in impls:
                            skip = DEFAULT_SKIPS.get((device.type, pre_name, name))
                            if make_err:
                                recs[name] = {"status": "n/a", "reason": make_err}
                            elif skip and not cfg.impls_explicit and not cfg.quick:
                                recs[name] = {"status": "skipped", "reason": skip}
                            else:
                                todo.append(name)
                        groups = [todo] if interleave else [[name] for name in todo]
                        for group in groups:
                            if group:
                                recs.update(_measure_group(cfg, device, params, opt_name, group, stream, samples, bar))
                        for name in impls:
                            rec = recs[name]
                            impl = get_impl(name)
                            try:
                                # precision options change only 16-bit params (elsewhere the row is n/a)
                                bpe = opt.bytes_per_element(es, **(impl.precision_kwargs if es == 2 else {}))
                            except ValueError:  # e.g. remainders on fp16: the row is n/a anyway
                                bpe = opt.bytes_per_element(es)
                            nbytes = preset.numel * bpe
                            if rec.get("median_ms"):
                                rec["gbps"] = nbytes / (rec["median_ms"] / 1e3) / 1e9
                            out["results"].append({
                                "device": dev_str, "dtype": dt_name, "preset": pre_name, "optimizer": opt_name,
                                "impl": name, "precision": impl.precision if impl.is_fusedopt else None,
                                "num_tensors": preset.num_tensors, "numel": preset.numel,
                                "bytes_per_step": nbytes, "bytes_per_element": bpe,
                                "warmup": cfg.warmup, **rec})
                        bar.update(len(impls))
                    del params
                    _free(device)
            stream.close()
            gbps = [x["gbps"] for x in samples]
            info["bandwidth"] = {
                "gbps": statistics.median(gbps),
                "gbps_max": max(x["gbps_max"] for x in samples),
                "samples_gbps": gbps,
                "method": f"{stream.method}; median of {len(samples)} samples taken between timing rounds",
                "bytes_per_rep": stream.bytes_per_rep,
                "times_ms": [t for x in samples for t in x["times_ms"]],
            }
            for r in out["results"]:
                if r["device"] == dev_str and r.get("gbps"):
                    # against the reference sampled in the cell's own rounds: the machine's
                    # bandwidth drifts over a run (by a third on the development VM), and a
                    # cell compared with the run's median would carry the drift as a result
                    r["pct_of_stream"] = 100.0 * r["gbps"] / r["stream_gbps_during"]
    finally:
        bar.close()
    _add_speedups(out["results"])
    for (dtype_, pre, impl), why in DEFAULT_SKIPS.items():
        if any(r["status"] == "skipped" and r["preset"] == pre and r["impl"] == impl for r in out["results"]):
            out["notes"].append(f"{impl} on {pre} ({dtype_}): {why}")
    for opt_name in dict.fromkeys(r["optimizer"] for r in out["results"]):
        torch_rows = any(r["optimizer"] == opt_name and not get_impl(r["impl"]).is_fusedopt for r in out["results"])
        if not OPTIMIZERS[opt_name].has_torch and not torch_rows:  # (named torch rows are n/a, saying so)
            out["notes"].append(f"{opt_name}: torch.optim has no {opt_name.capitalize()}, so fusedopt rows only "
                                "(no speedups; its GB/s and % of stream BW are the measure)")
    if fusedopt_reason:
        out["notes"].append(f"fusedopt rows are n/a: {fusedopt_reason}")
    elif fusedopt_desc.startswith("STAND-IN"):
        out["notes"].append(f"WARNING: the 'fusedopt' rows are a {fusedopt_desc}, not fusedopt")
    for dev_str, info in out["devices"].items():
        g = info["bandwidth"]["samples_gbps"]
        if len(g) > 2 and min(g) < 0.8 * max(g):
            out["notes"].append(
                f"{dev_str}: the streaming reference varied from {min(g):.1f} to {max(g):.1f} GB/s during the run "
                f"(median {statistics.median(g):.1f}): bandwidth drifted"
                + ("; implementations were timed interleaved, so speedups are comparable" if info["interleaved"] else ""))
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
    """speedup = t(this torch impl) / t(fusedopt); graph rows compare with fusedopt-graph.

    Also, on every row but torch-fused's own: speedup_vs_torch_fused = t(torch-fused) / t(row)
    (> 1: this row is faster than torch's fused step), for the precision variants' table."""
    ref = {}
    fused = {}
    for r in results:
        if r["impl"] in ("fusedopt", "fusedopt-graph") and r["status"] == "ok":
            ref[(r["device"], r["dtype"], r["preset"], r["optimizer"], r["impl"])] = r["median_ms"]
        if r["impl"] == "torch-fused" and r["status"] == "ok":
            fused[(r["device"], r["dtype"], r["preset"], r["optimizer"])] = r["median_ms"]
    for r in results:
        t = fused.get((r["device"], r["dtype"], r["preset"], r["optimizer"]))
        if t and r["status"] == "ok" and r["impl"] != "torch-fused" and not r["impl"].endswith("-graph"):
            r["speedup_vs_torch_fused"] = t / r["median_ms"]
    for r in results:
        if r["impl"].startswith("fusedopt") or r["status"] != "ok":
            continue
        which = "fusedopt-graph" if r["impl"].endswith("-graph") else "fusedopt"
        t = ref.get((r["device"], r["dtype"], r["preset"], r["optimizer"], which))
        if t:
            r["fusedopt_speedup"] = r["median_ms"] / t
            r["speedup_vs"] = which
