"""``fusedopt-bench --host-cost`` (fusedopt/bench/host_cost.py) and its script,
benchmarks/bench_host_cost.py: what it reports and the errors it gives. Function, not speed: a few
hundred params, one block of steps."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt.bench import host_cost
from fusedopt.bench.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
needs_extension = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")


@needs_extension
def test_host_cost_reports_every_optimizer_implementation_and_condition(tmp_path, capsys):
    assert main(["--host-cost", "--devices", "cpu", "--tensors", "300", "--reps", "20", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "host_cost.json").read_text())
    assert saved["meta"]["torch"] == torch.__version__
    (res,) = saved["devices"]
    assert res["device"] == "cpu" and res["tensors"] == 300 and res["steps"] == 20
    cells = {(r["optimizer"], r["impl"], r["condition"]) for r in res["results"]}
    assert cells == {(o, i, c) for o in ("adam", "sgd") for i in host_cost.IMPLS for c in host_cost.CONDITIONS}
    for r in res["results"]:
        assert len(r["times_ms"]) == 20 and all(t > 0 for t in r["times_ms"])
        # µs per tensor: the median step time (ms) x 1000 / tensors
        assert r["us_per_tensor"] == pytest.approx(statistics.median(r["times_ms"]) * 1e3 / 300)
        line = next(x for x in printed.splitlines() if x.strip().startswith(f"{r['optimizer']}") and
                    f" {r['condition']}: " in x)
        name = {"fusedopt": "fusedopt ", "fusedopt-flat": "fusedopt flat ", "torch-fused": "torch fused "}[r["impl"]]
        assert f"{name}{r['us_per_tensor']:.3f}" in line, (line, r["impl"], r["us_per_tensor"])


@needs_extension
def test_host_cost_script_keeps_its_flags():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_cost.py"), "--tensors", "100",
                           "--reps", "10", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "100 one-element float32 params on cpu" in proc.stdout
    for name in ("adam", "sgd"):
        for cond in host_cost.CONDITIONS:
            assert f"{name:5s} {cond}: host µs per tensor: fusedopt " in proc.stdout, proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--host-cost", "--devices", "cpu", "--reps", "5"], "reps must be >= 10"),
    (["--host-cost", "--devices", "cpu", "--tensors", "0"], "tensors must be >= 1"),
    (["--host-cost", "--optimizers", "adamw"], "unknown optimizer for --host-cost adamw"),
    (["--host-cost", "--presets", "huge"], "--host-cost takes only"),
    (["--tensors", "100", "--quick"], "--tensors is an option of --host-cost"),
])
def test_host_cost_refuses_what_it_cannot_do(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
