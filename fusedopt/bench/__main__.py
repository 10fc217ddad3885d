"""``python -m fusedopt.bench`` / ``fusedopt-bench``: fusedopt vs torch.optim step benchmark.

Examples::

    fusedopt-bench                                  # defaults: CPU + every GPU, fp32, 4 presets
    fusedopt-bench --quick --out /tmp/bench         # tiny sizes, seconds; writes json/md/png
    fusedopt-bench --devices cuda --dtypes fp32 bf16 --optimizers adam adamw --out results/
    fusedopt-bench --distributed fsdp2 --nproc 2   # FSDP2-sharded model, one process per rank
    fusedopt-bench --host-cost --devices cpu         # host µs per tensor on 10,000 one-element params
    fusedopt-bench --presets mixed                  # bf16 GPT-2: fusedopt precision options vs torch
    fusedopt-bench --optimizers rmsprop adagrad lion
    fusedopt-bench --presets huge --dtypes bf16 --optimizers adam --precision master master+fp32-state
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from fusedopt.bench.optimizers import (DEFAULT_IMPLS, DEFAULT_OPTIMIZERS, IMPLS, OPTIMIZERS, PRECISIONS,
                                       all_impl_names)
from fusedopt.bench.presets import DEFAULT_PRESETS, PRESETS
from fusedopt.bench.runner import BUSY_WARN, DTYPES, BenchConfig, run
from fusedopt.bench.sysinfo import other_cpu_busy_at_start

_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float64": "fp64", "double": "fp64"}


def _split(values: list[str] | None, flag: str = "") -> list[str] | None:
    """A list flag's values (space- or comma-separated); None when the flag was not given. A flag
    given with nothing in it is an error, not the defaults."""
    if values is None:
        return None
    out = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    if not out:
        raise SystemExit(f"fusedopt-bench: {flag or 'a list flag'} was given no values")
    return out


def _check_out_dir(out: str | None) -> None:
    """Make --out's directory now and check that it takes files: an unusable one is reported
    before the benchmark runs, not after."""
    if not out:
        return
    import tempfile
    from pathlib import Path

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"fusedopt-bench: --out {out}: cannot write results there ({e.strerror or e})") from None


def _choose(kind: str, given: list[str], allowed) -> list[str]:
    bad = [g for g in given if g not in allowed]
    if bad:
        raise SystemExit(f"fusedopt-bench: unknown {kind} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(given))


def _devices(given: list[str] | None) -> list[str]:
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [f"cuda:{i}" for i in range(n_gpu)]
    if not given:
        return ["cpu"] + gpus
    out = []
    for d in given:
        if d == "all":
            out += ["cpu"] + gpus
        elif d == "cuda":
            if not gpus:
                raise SystemExit("fusedopt-bench: --devices cuda but no CUDA device is visible")
            out += gpus
        elif d == "cpu":
            out.append("cpu")
        elif d.startswith("cuda:"):
            index = d.split(":", 1)[1]
            if not index.isdigit():
                raise SystemExit(f"fusedopt-bench: unknown device {d!r} (cuda:N takes a device index N >= 0)")
            idx = int(index)
            if idx >= n_gpu:
                raise SystemExit(f"fusedopt-bench: {d} is not visible ({n_gpu} CUDA devices)")
            out.append(d)
        else:
            raise SystemExit(f"fusedopt-bench: unknown device {d!r} (cpu, cuda, cuda:N, all)")
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedopt-bench",
        description="Time one optimizer step of fusedopt SGD/Adam/AdamW/RMSprop/Adagrad/Lion against "
                    "torch.optim's for-loop, foreach and fused implementations on model-shaped parameter "
                    "lists, optionally with fusedopt's precision options (master weights, state dtype, "
                    "stochastic rounding) as extra rows.",
        epilog="List flags take space- or comma-separated values. Effective GB/s counts the bytes the "
               "update must move (Adam 7 x elem size per element, SGD+momentum 5x, plain SGD 3x, "
               "RMSprop/Adagrad/Lion 5x; precision options: each tensor at its own dtype, e.g. bf16 "
               "Adam with master_weights and fp32 moments 28 bytes); see fusedopt/bench/bytes_model.py. "
               "The mixed preset (GPT-2 small shapes in bf16) defaults to --dtypes bf16 --optimizers "
               "adam sgd --impls fusedopt torch-foreach torch-fused --precision all; flags given "
               "explicitly override those defaults.",
    )
    p.add_argument("--presets", nargs="+", metavar="P",
                   help=f"parameter-list presets (default: {' '.join(DEFAULT_PRESETS)}; choices: {', '.join(PRESETS)})")
    p.add_argument("--devices", nargs="+", metavar="D",
                   help="cpu, cuda (all GPUs), cuda:N, all (default: cpu and every visible GPU)")
    p.add_argument("--dtypes", nargs="+", metavar="T", help=f"{', '.join(DTYPES)} (default: fp32)")
    p.add_argument("--optimizers", nargs="+", metavar="O",
                   help=f"default: {' '.join(DEFAULT_OPTIMIZERS)}; choices: {', '.join(OPTIMIZERS)} "
                        "(torch has no fused RMSprop: that row is n/a; and no Lion: its torch rows are left "
                        "out, or n/a where --impls names them)")
    p.add_argument("--impls", nargs="+", metavar="I",
                   help=f"default: {', '.join(DEFAULT_IMPLS)} (graph variants only on CUDA); also fusedopt-flat; naming them "
                        "explicitly also disables the default skips; precision variants "
                        "(fusedopt:OPTION) can be named too")
    p.add_argument("--precision", nargs="+", metavar="OPT",
                   help="add a fusedopt row per fusedopt precision option, next to the plain fusedopt row "
                        f"(16-bit params only; n/a on fp32): {', '.join(PRECISIONS)}, or all. none = "
                        "state in the param dtype; master = master_weights; master+rem = + "
                        "master_remainders (bf16); fp32-state = state_dtype=float32; sr = "
                        "stochastic_rounding (default: none, or the preset's own: all for mixed)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed steps per cell (default: auto - at least 3, until ~--budget seconds, "
                        "at most 15 on CPU / 100 on GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing (default: 2; 1 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="auto reps: seconds of timed steps per cell (default: 0.6)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed steps are taken in this many round-robin passes over the implementations, "
                        "with a bandwidth sample per pass (default: 3)")
    p.add_argument("--no-interleave", action="store_true",
                   help="on CPU, time implementations one after another instead of round-robin "
                        "(needs only one optimizer state in memory at a time; always so on GPU)")
    p.add_argument("--seed", type=int, default=0, help="torch.Generator seed for params/grads (default: 0)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.md, results.png here")
    p.add_argument("--quick", action="store_true",
                   help="tiny presets, 1 warm-up, 3 reps: a smoke test that finishes in seconds")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--distributed", choices=["fsdp2"], metavar="KIND",
                   help="fsdp2: time the step on a model sharded with torch.distributed.fsdp.fully_shard over "
                        "--nproc spawned processes (DTensor params; gloo on CPU, NCCL with a GPU per rank), "
                        "fusedopt against torch on the same DTensors; defaults there: --presets gpt2-small "
                        "--optimizers adamw, one --devices entry (cpu or cuda). --presets many-4k is where "
                        "torch's DTensor dispatch dominates, but its first steps take ~1 min there")
    p.add_argument("--nproc", type=int, default=None, help="--distributed: number of ranks (default: 2)")
    p.add_argument("--host-cost", action="store_true",
                   help="instead of the grid: the host time of one step per tensor (\"host µs per tensor\"), "
                        "fusedopt (plain and flattened) against torch fused, Adam and SGD, on --tensors "
                        "one-element float32 params, cold and warm (fusedopt/bench/host_cost.py); takes "
                        "--devices (default: cpu and every GPU), --optimizers (adam, sgd), --reps (default "
                        "60, in blocks of 10), --seed and --out (writes host_cost.json)")
    p.add_argument("--tensors", type=int, default=None, help="--host-cost: number of params (default: 10000)")
    return p


def _main_host_cost(args) -> int:
    import json
    from pathlib import Path

    from fusedopt.bench import host_cost
    from fusedopt.bench.sysinfo import environment

    others = [flag for flag, given in (
        ("--distributed", args.distributed), ("--precision", args.precision), ("--presets", args.presets),
        ("--dtypes", args.dtypes), ("--impls", args.impls), ("--quick", args.quick), ("--warmup", args.warmup),
        ("--budget", args.budget), ("--rounds", args.rounds), ("--no-interleave", args.no_interleave),
        ("--nproc", args.nproc)) if given is not None and given is not False]
    if others:
        raise SystemExit("fusedopt-bench: --host-cost takes only --devices, --optimizers, --reps, --tensors, "
                         f"--seed, --out and --no-progress (given: {', '.join(others)})")
    optimizers = _choose("optimizer for --host-cost",
                         _split(args.optimizers, "--optimizers") or list(host_cost.OPTIMIZERS), host_cost.OPTIMIZERS)
    _check_out_dir(args.out)
    reps = 60 if args.reps is None else args.reps
    tensors = 10_000 if args.tensors is None else args.tensors
    out = {"meta": environment(), "config": {"tensors": tensors, "reps": reps, "seed": args.seed,
                                             "optimizers": optimizers}, "devices": []}
    for device in _devices(_split(args.devices, "--devices")):
        try:
            res = host_cost.measure(device, tensors=tensors, reps=reps, optimizers=optimizers, seed=args.seed)
        except ValueError as e:
            raise SystemExit(f"fusedopt-bench: {e}") from None
        print(host_cost.format_lines(res))
        out["devices"].append(res)
    if args.out:
        path = Path(args.out) / "host_cost.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _main_distributed(args) -> int:
    from fusedopt.bench import distributed

    if args.precision or "mixed" in (_split(args.presets, "--presets") or []):
        raise SystemExit("fusedopt-bench: --precision and the mixed preset are not available with --distributed")
    presets = _choose("preset", _split(args.presets, "--presets") or list(distributed.DEFAULT_PRESETS), PRESETS)
    optimizers = _choose("optimizer", _split(args.optimizers, "--optimizers") or list(distributed.DEFAULT_OPTIMIZERS),
                         OPTIMIZERS)
    impls = [i for i in _choose("impl", _split(args.impls, "--impls") or list(DEFAULT_IMPLS), IMPLS)
             if not IMPLS[i].graph]
    dtypes = [_DTYPE_ALIASES.get(d, d) for d in (_split(args.dtypes, "--dtypes") or ["fp32"])]
    dtypes = _choose("dtype", dtypes, DTYPES)
    devices = _split(args.devices, "--devices") or [None]
    if len(dtypes) != 1 or len(devices) != 1 or devices[0] not in (None, "cpu", "cuda"):
        raise SystemExit("fusedopt-bench: --distributed takes one --dtypes entry and one --devices entry (cpu or cuda)")
    if args.nproc < 1:
        raise SystemExit("fusedopt-bench: --nproc must be >= 1")
    if args.reps is not None and args.reps < 1:
        raise SystemExit("fusedopt-bench: --reps must be >= 1")
    _check_out_dir(args.out)
    try:
        res = distributed.run(args.distributed, args.nproc, presets, optimizers, impls,
                              dtype=str(DTYPES[dtypes[0]]).removeprefix("torch."), device=devices[0],
                              quick=args.quick, warmup=args.warmup, reps=args.reps, budget_s=args.budget,
                              rounds=args.rounds, interleave=not args.no_interleave, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"fusedopt-bench: {e}") from None
    print(distributed.format_table(res))
    if args.out:
        paths = distributed.write_results(res, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _timing_defaults(args) -> None:
    """Fill in --warmup, --budget, --rounds and --nproc where not given, and check them."""
    if args.nproc is not None and not args.distributed:
        raise SystemExit("fusedopt-bench: --nproc is an option of --distributed")
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.budget is None:
        args.budget = 0.6
    if args.rounds is None:
        args.rounds = 3
    if args.nproc is None:
        args.nproc = 2
    if args.warmup < 0:
        raise SystemExit("fusedopt-bench: --warmup must be >= 0")
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise SystemExit(f"fusedopt-bench: --budget must be a positive number of seconds, got {args.budget}")
    if args.rounds < 1:
        raise SystemExit("fusedopt-bench: --rounds must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host_cost:
        return _main_host_cost(args)
    if args.tensors is not None:
        raise SystemExit("fusedopt-bench: --tensors is an option of --host-cost")
    _timing_defaults(args)
    if args.distributed:
        return _main_distributed(args)
    presets = _choose("preset", _split(args.presets, "--presets") or list(DEFAULT_PRESETS), PRESETS)
    dtypes = _choose("dtype", [_DTYPE_ALIASES.get(d, d) for d in (_split(args.dtypes, "--dtypes") or ["fp32"])],
                     DTYPES)
    optimizers = _choose("optimizer", _split(args.optimizers, "--optimizers") or list(DEFAULT_OPTIMIZERS), OPTIMIZERS)
    impls_explicit = args.impls is not None
    impls = _choose("impl", _split(args.impls, "--impls") or list(DEFAULT_IMPLS), all_impl_names())
    precisions = _split(args.precision, "--precision")
    if precisions is not None:
        precisions = list(PRECISIONS) if "all" in precisions else _choose("precision option", precisions, PRECISIONS)
    if not any(i.startswith("fusedopt") for i in impls) and not precisions:
        print("fusedopt-bench: note: no fusedopt implementation selected, so no speedups", file=sys.stderr)
    if args.reps is not None and args.reps < 1:
        raise SystemExit("fusedopt-bench: --reps must be >= 1")
    cfg = BenchConfig(
        presets=presets, devices=_devices(_split(args.devices, "--devices")), dtypes=dtypes, optimizers=optimizers,
        impls=impls, impls_explicit=impls_explicit, dtypes_explicit=args.dtypes is not None,
        optimizers_explicit=args.optimizers is not None, precisions=precisions, reps=args.reps, warmup=args.warmup,
        budget_s=args.budget, seed=args.seed, quick=args.quick, rounds=args.rounds,
        interleave=False if args.no_interleave else None,
    )
    if args.quick:
        cfg.reps = cfg.reps or 3
    _check_out_dir(args.out)

    from fusedopt.bench.optimizers import fusedopt_classes
    from fusedopt.bench.report import format_table, write_results

    _cls, desc, reason = fusedopt_classes()
    if reason:
        print(f"fusedopt-bench: WARNING: {reason}; fusedopt rows will be n/a", file=sys.stderr)
    elif desc.startswith("STAND-IN"):
        print(f"fusedopt-bench: WARNING: 'fusedopt' rows use a {desc}", file=sys.stderr)
    busy = other_cpu_busy_at_start()
    if "cpu" in cfg.devices and busy is not None and busy > BUSY_WARN:
        print(f"fusedopt-bench: WARNING: other processes are using {busy:.0%} of the CPU; "
              "CPU timings will be noisy", file=sys.stderr)
    t0 = time.perf_counter()
    res = run(cfg, progress=not args.no_progress)
    print(format_table(res))
    if args.out:
        paths = write_results(res, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
