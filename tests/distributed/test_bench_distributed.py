"""Smoke test of ``python -m fusedopt.bench --distributed fsdp2 --nproc 2`` on tiny shapes:
it spawns its ranks, times fusedopt and torch on the same DTensor params, and reports them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import fusedopt

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
def test_distributed_bench_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "fusedopt.bench", "--distributed", "fsdp2", "--nproc", "2", "--devices", "cpu",
           "--quick", "--presets", "many-4k", "--impls", "fusedopt", "torch-fused", "torch-foreach",
           "--optimizers", "adamw", "sgd", "--rounds", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp2: 2 ranks, gloo on cpu" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["optimizer"], r["impl"]): r for r in res["results"]}
    assert set(rows) == {(o, i) for o in ("adamw", "sgd") for i in ("fusedopt", "torch-fused", "torch-foreach")}
    for (opt, impl), r in rows.items():
        if (opt, impl) == ("sgd", "torch-fused"):  # torch has no DTensor rule for its fused SGD
            assert r["status"] == "n/a" and "_fused_sgd_" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["local_numel"] == [25_600, 25_600]  # 100 x 512 elements, sharded in halves
        for rank in r["ranks"]:
            assert len(rank["dtensor"]["times_ms"]) == 3 and len(rank["plain"]["times_ms"]) == 3
        assert r["median_ms"] > 0 and r["plain_median_ms"] > 0 and r["host_ms"] >= 0
        if impl != "fusedopt":
            assert r["fusedopt_speedup"] == pytest.approx(r["median_ms"] / rows[(opt, "fusedopt")]["median_ms"])
    assert (tmp_path / "results.md").read_text().startswith("# fusedopt distributed benchmark")
