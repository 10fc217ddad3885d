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


def test_run_without_a_measured_row_still_writes_every_file(tmp_path, capsys):
    # every row n/a (torch has no fused RMSprop), and a CUDA graph variant named on the CPU: the
    # chart has panels without a value to put on a log scale; the variants named get n/a rows
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--optimizers", "rmsprop", "lion", "--impls",
               "torch-fused", "fusedopt-graph", "--reps", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    recs = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {(r["optimizer"], r["impl"]) for r in recs} == {
        (o, i) for o in ("rmsprop", "lion") for i in ("torch-fused", "fusedopt-graph")}
    assert all(r["status"] == "n/a" for r in recs)
    reasons = {(r["optimizer"], r["impl"]): r["reason"] for r in recs}
    assert "needs a CUDA device" in reasons["rmsprop", "fusedopt-graph"]
    assert "no Lion" in reasons["lion", "torch-fused"]
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert "n/a: fusedopt-graph needs a CUDA device" in capsys.readouterr().out


def test_lion_leaves_torch_out_by_default_with_a_note():
    cfg = runner.BenchConfig(presets=["huge"], devices=["cpu"], dtypes=["fp32"], optimizers=["lion"],
                             impls=["fusedopt", "torch-fused"], reps=1, warmup=0, quick=True)
    res = runner.run(cfg, progress=False)
    assert [r["impl"] for r in res["results"]] == ["fusedopt"]
    assert any("torch.optim has no Lion" in n for n in res["notes"])


@pytest.mark.parametrize("argv, message", [
    (["--devices", "cuda:abc"], "cuda:N takes a device index"),
    (["--devices", "cuda:-1"], "cuda:N takes a device index"),
    (["--budget", "nan"], "--budget must be a positive number"),
    (["--budget", "inf"], "--budget must be a positive number"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--nproc", "3"], "--nproc is an option of --distributed"),
    (["--presets", ","], "--presets was given no values"),
    (["--impls", ""], "--impls was given no values"),
    (["--host-cost", "--warmup", "0"], "--no-progress (given: --warmup)"),
    (["--host-cost", "--rounds", "2", "--no-interleave"], "(given: --rounds, --no-interleave)"),
])
def test_bad_flags_are_refused_before_anything_runs(argv, message, monkeypatch):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        main(["--quick", *argv] if "--host-cost" not in argv else argv)
    assert message in str(e.value)


@pytest.mark.parametrize("host_cost", [False, True])
def test_unwritable_out_is_refused_before_the_run(tmp_path, monkeypatch, host_cost):
    import fusedopt.bench.host_cost as host_cost_module

    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    monkeypatch.setattr(host_cost_module, "measure", lambda *a, **k: pytest.fail("the benchmark ran"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        argv = ["--host-cost", "--devices", "cpu"] if host_cost else ["--quick", "--devices", "cpu"]
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(out)])
        assert f"--out {out}: cannot write results there" in str(e.value)


def test_quick_keeps_an_explicit_warmup(tmp_path):
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--optimizers", "sgd", "--impls", "fusedopt",
               "--warmup", "3", "--reps", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    (rec,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert rec["warmup"] == 3


def test_legend_names_every_implementation_of_the_run(tmp_path, monkeypatch):
    # the first panel (fp32) has the precision variants as n/a only; the legend still shows
    # each in the colour of its bars in the bf16 panel
    import matplotlib.figure

    from fusedopt.bench.report import _impl_colors

    seen = {}
    real_legend = matplotlib.figure.Figure.legend

    def legend(self, *args, **kwargs):
        seen.update({h.get_label(): h.get_facecolor() for h in kwargs["handles"]})
        return real_legend(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", legend)
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--dtypes", "fp32", "bf16", "--optimizers",
               "sgd", "--impls", "fusedopt", "torch-fused", "--precision", "master", "sr", "--reps", "1",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    impls = ["fusedopt", "fusedopt:master", "fusedopt:sr", "torch-fused"]
    assert sorted(seen) == impls
    from matplotlib.colors import to_rgba
    for impl, color in _impl_colors(impls).items():
        assert seen[impl] == to_rgba(color)


def test_na_precision_rows_count_the_plain_bytes(tmp_path):
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--dtypes", "fp64", "--optimizers", "adam",
               "--impls", "fusedopt", "--precision", "fp32-state", "--reps", "1", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    recs = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert recs["fusedopt:fp32-state"]["status"] == "n/a"
    assert recs["fusedopt:fp32-state"]["bytes_per_element"] == recs["fusedopt"]["bytes_per_element"] == 7 * 8


def test_git_commit_is_only_fusedopts_own(tmp_path):
    import shutil

    from fusedopt.bench.sysinfo import git_commit

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    # a copy of the package inside someone else's repository records no commit, not theirs
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "theirs"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "site").mkdir()
    assert git_commit(tmp_path / "site") == {"commit": None, "dirty": None}
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path)["commit"] == theirs  # at a repository's top: its commit
