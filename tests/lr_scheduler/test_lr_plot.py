"""plot(), the schedule-spec parser and ``python -m fusedopt.lr_scheduler plot``."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch.optim import lr_scheduler as tls

from fusedopt.lr_scheduler import LinearWarmup, WarmupCosine, parse_schedule, plot
from fusedopt.lr_scheduler._cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


def assert_valid_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas


def test_plot_several_schedulers(tmp_path):
    out = tmp_path / "lr.png"
    curves = plot(
        [
            ("warmup+cosine", lambda o: WarmupCosine(o, warmup_steps=10, total_steps=100)),
            ("step", lambda o: tls.StepLR(o, step_size=30, gamma=0.5)),
        ],
        steps=120,
        path=out,
        lr=0.2,
    )
    assert_valid_png(out)
    assert list(curves) == ["warmup+cosine", "step"]
    assert len(curves["step"]) == 120
    assert curves["step"] == pytest.approx([0.2 * 0.5 ** (t // 30) for t in range(120)])
    assert curves["warmup+cosine"][:3] == pytest.approx([0.0, 0.02, 0.04])
    assert curves["warmup+cosine"][10] == pytest.approx(0.2)


def test_plot_single_pair_and_str_path(tmp_path):
    out = str(tmp_path / "one.png")
    curves = plot(("warmup", lambda o: LinearWarmup(o, 5, 0.0, 0.1)), steps=8, path=out)
    assert_valid_png(out)
    assert curves["warmup"] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1])


def test_plot_rejects_instances_and_metric_schedulers(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"\(name, factory\) pairs, not scheduler instances"):
        plot([("x", tls.StepLR(opt, 10))], steps=10, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau needs a metric"):
        plot([("p", lambda o: tls.ReduceLROnPlateau(o))], steps=10, path=tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"Expected positive integer steps, but got 0"):
        plot([("s", lambda o: tls.StepLR(o, 10))], steps=0, path=tmp_path / "s.png")
    assert not list(tmp_path.iterdir())


def test_parse_schedule_builds_nested_schedulers():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = parse_schedule(
        "LinearWarmup(warmup_steps=5, start_lr=0.0, end_lr=0.08, after=CosineAnnealingLR(T_max=50, eta_min=1e-3))"
    )(opt)
    assert type(sched) is LinearWarmup and type(sched.after) is tls.CosineAnnealingLR
    assert sched.after.optimizer is opt and sched.after.T_max == 50 and sched.after.base_lrs == [0.08]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    seq = parse_schedule("SequentialLR(schedulers=[LinearLR(total_iters=4), ExponentialLR(gamma=0.9)], milestones=[4])")(
        opt
    )
    assert [type(s).__name__ for s in seq._schedulers] == ["LinearLR", "ExponentialLR"]
    assert seq._milestones == [4]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("Nope(step_size=3)", r"Unknown scheduler 'Nope'"),
        ("StepLR(10)", r"keyword arguments only"),
        ("StepLR(step_size=x)", r"must be Python literals"),
        ("StepLR(**{'step_size': 3})", r"'\*\*' arguments are not allowed"),
        ("StepLR(step_size=3", r"Cannot parse schedule"),
        ("torch.optim.lr_scheduler.StepLR(step_size=3)", r"Expected a schedule like"),
        ("StepLR(step_size=3) + 1", r"Expected a schedule like"),
        ("StepLR(optimizer=None, step_size=3)", r"the optimizer is supplied"),
        ("LambdaLR(lr_lambda=lambda t: 1.0)", r"must be Python literals"),
    ],
)
def test_parse_schedule_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(spec)


def test_parse_schedule_never_evaluates(tmp_path):
    marker = tmp_path / "pwned"
    for spec in (
        f"StepLR(step_size=open({str(marker)!r}, 'w'))",
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"StepLR(step_size=[open({str(marker)!r}, 'w')])",
    ):
        with pytest.raises(ValueError):
            parse_schedule(spec)
    assert not marker.exists()


def test_cli_main_in_process(tmp_path, capsys):
    out = tmp_path / "main.png"
    rc = main(["plot", "--schedule", "NoamDecay(d_model=16, warmup_steps=20)", "--steps", "50", "--out", str(out)])
    assert rc == 0
    assert_valid_png(out)
    assert f"wrote {out}" in capsys.readouterr().out

    bad = tmp_path / "bad.png"
    rc = main(["plot", "--schedule", "WarmupCosine(warmup_steps=10, total_steps=5)", "--out", str(bad)])
    assert rc == 2
    assert "Expected total_steps > warmup_steps" in capsys.readouterr().err
    assert not bad.exists()


def test_cli_subprocess_writes_png(tmp_path):
    out = tmp_path / "cli.png"
    cmd = [
        sys.executable,
        "-m",
        "fusedopt.lr_scheduler",
        "plot",
        "--schedule",
        "WarmupCosine(warmup_steps=100,total_steps=1000)",
        "--schedule",
        "StepLR(step_size=200,gamma=0.5)",
        "--lr",
        "0.1",
        "--steps",
        "1000",
        "--out",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_valid_png(out)


@pytest.mark.parametrize("spec", ["StepLR(step_size=0)", "CosineAnnealingLR(T_max=0)",
                                  "CyclicLR(base_lr=0.01, max_lr=0.1, step_size_up=0)",
                                  "StepLR(step_size=3, last_epoch=5)"])
def test_cli_schedule_that_cannot_run_is_an_error_not_a_traceback(tmp_path, capsys, spec):
    # torch's schedulers take these arguments and then divide by zero, or miss initial_lr
    rc = main(["plot", "--schedule", spec, "--steps", "10", "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: a schedule cannot run with these arguments" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
