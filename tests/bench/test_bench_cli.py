"""Smoke tests of ``python -m fusedopt.bench`` on the --quick tiny presets.

The subprocess runs with OMP_NUM_THREADS=1: this checks function, not speed, and a single
intra-op thread keeps a tiny run fast even when the machine is busy (two OpenMP threads on two
shared cores can stall for a scheduler tick at every barrier).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt.bench.runner as runner
from fusedopt.bench.__main__ import main
from fusedopt.bench.optimizers import Unsupported

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRESETS = ["gpt2-small", "many-small", "huge", "llama"]
OPTS = ["sgd", "adam", "adamw"]
CPU_IMPLS = ["fusedopt", "torch-forloop", "torch-foreach", "torch-fused"]


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs below check behaviour, not speed: one thread, as in the subprocess."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fusedopt.bench", "--quick", "--devices", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_cli_prints_table(quick_run):
    _out, proc = quick_run
    assert "ms/step" in proc.stdout and "fusedopt speedup" in proc.stdout
    assert "streaming bandwidth" in proc.stdout
    for preset in PRESETS:
        assert preset in proc.stdout
    assert "fusedopt-bench" in proc.stderr  # the tqdm progress bar


def test_results_json(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    assert {"meta", "devices", "presets", "results", "notes"} <= set(res)
    meta = res["meta"]
    for key in ("torch", "fusedopt", "git", "cpu", "python", "fusedopt_impl", "config", "wall_s"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__
    assert "commit" in meta["git"]
    assert meta["cpu"]
    assert res["devices"]["cpu"]["name"]
    bw = res["devices"]["cpu"]["bandwidth"]
    assert bw["gbps"] > 0 and "mul_" in bw["method"]
    # one reference sample up front, then one per round of every (preset, optimizer) group
    assert res["devices"]["cpu"]["interleaved"] is True
    assert len(bw["samples_gbps"]) == 1 + len(PRESETS) * len(OPTS) * 3

    recs = res["results"]
    cells = {(r["preset"], r["optimizer"], r["impl"]) for r in recs}
    assert cells == {(p, o, i) for p in PRESETS for o in OPTS for i in CPU_IMPLS}
    assert len(recs) == len(cells)
    for r in recs:
        # Every cell must have run, fusedopt included: this fails while fusedopt can't be imported.
        assert r["status"] == "ok", (r["preset"], r["optimizer"], r["impl"], r.get("reason"))
        assert len(r["times_ms"]) == 3 and all(t > 0 for t in r["times_ms"])
        assert r["rounds"] == 3 and r["stream_gbps_during"] > 0
        assert r["median_ms"] == sorted(r["times_ms"])[1]
        assert r["bytes_per_step"] == r["numel"] * r["bytes_per_element"]
        assert r["bytes_per_element"] == {"sgd": 20, "adam": 28, "adamw": 28}[r["optimizer"]]
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / (r["median_ms"] / 1e3) / 1e9)
        # against the reference sampled in the cell's own rounds, not the run's median
        assert r["pct_of_stream"] == pytest.approx(100 * r["gbps"] / r["stream_gbps_during"])
        if r["impl"] != "fusedopt":
            ref = next(x for x in recs if (x["preset"], x["optimizer"], x["impl"]) == (r["preset"], r["optimizer"], "fusedopt"))
            assert r["fusedopt_speedup"] == pytest.approx(r["median_ms"] / ref["median_ms"])
    assert "STAND-IN" not in meta["fusedopt_impl"]


def test_results_markdown(quick_run):
    out, _ = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# fusedopt benchmark")
    assert "| preset | optimizer | impl | ms/step | GB/s | % of stream BW | fusedopt speedup |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert len(table_rows) == len(PRESETS) * len(OPTS) * len(CPU_IMPLS)
    assert all(line.count("|") == 8 for line in table_rows)
    assert not any("| n/a |" in line for line in table_rows)


def test_results_png(quick_run):
    out, _ = quick_run
    data = (out / "results.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # 4 presets x 2 panels of bars, not an empty canvas


def test_entry_point_and_bad_flags(capsys):
    # pyproject: fusedopt-bench = "fusedopt.bench.__main__:main"
    assert callable(main)
    with pytest.raises(SystemExit):
        main(["--presets", "no-such-preset"])
    with pytest.raises(SystemExit):
        main(["--impls", "torch-magic"])
    with pytest.raises(SystemExit):
        main(["--reps", "0"])


def test_unsupported_variant_is_na_not_a_crash(monkeypatch, tmp_path, capsys):
    real = runner.build_optimizer

    def fake(impl, opt, params):
        if impl.name == "torch-foreach":
            raise Unsupported("pretend foreach refuses this dtype")
        if impl.name == "torch-fused":
            raise RuntimeError("pretend kernel error")
        return real(impl, opt, params)

    monkeypatch.setattr(runner, "build_optimizer", fake)
    rc = main(["--quick", "--devices", "cpu", "--presets", "many-small", "--optimizers", "sgd", "--impls",
               "fusedopt", "torch-foreach", "torch-fused", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    recs = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert recs["fusedopt"]["status"] == "ok"
    assert recs["torch-foreach"]["status"] == "n/a" and "pretend" in recs["torch-foreach"]["reason"]
    assert recs["torch-fused"]["status"] == "n/a" and "RuntimeError" in recs["torch-fused"]["reason"]
    text = capsys.readouterr().out
    assert "n/a: pretend foreach refuses this dtype" in text
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_default_skip_is_reported_and_explicit_impls_override():
    cfg = runner.BenchConfig(presets=["many-small"], devices=["cpu"], dtypes=["fp32"], optimizers=["sgd"],
                             impls=["torch-forloop"], reps=1, warmup=0)
    res = runner.run(cfg, progress=False)
    (rec,) = res["results"]
    assert rec["status"] == "skipped"
    assert any("torch-forloop on many-small" in n for n in res["notes"])
    assert rec["num_tensors"] == 10_000


def test_no_interleave_and_fixed_reps(tmp_path):
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--optimizers", "adam", "--impls", "fusedopt",
               "torch-fused", "--no-interleave", "--reps", "4", "--warmup", "0", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["devices"]["cpu"]["interleaved"] is False
    for r in res["results"]:
        assert r["status"] == "ok" and r["rounds"] == 1 and len(r["times_ms"]) == 4
        assert r["bytes_per_step"] == (1 << 18) * 28


def test_split_counts():
    assert runner._split(7, 3) == [3, 2, 2]
    assert runner._split(2, 3) == [1, 1]
    assert runner._split(15, 1) == [15]
