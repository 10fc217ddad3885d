"""examples/train_digits.py on a few steps: torch.optim.AdamW and fusedopt.AdamW curves overlap.

Tolerance, argued from measurements (40 steps, default 563k-param MLP, warmup-cosine):

* rounding only: fusedopt.AdamW and torch's fused AdamW differ from torch's for-loop AdamW by
  at most ~1.2e-7 in the loss, i.e. about one float32 ulp of a loss near 2.3 (ulp 2.4e-7);
* real math differences are far larger: lr off by 1% -> 2.1e-2, eps 1e-6 instead of 1e-8 ->
  1.6e-2, beta2 0.99 -> 2.6e-2, Adam's L2 decay instead of AdamW's decoupled decay -> 2.1,
  and even weight decay off by 10% -> 1.7e-4.

TOL = 1e-5 (~40 ulp) sits two orders of magnitude above the rounding noise and an order below
the subtlest of those bugs; ``test_tolerance_detects_a_small_math_error`` re-checks the
latter on every run, so the test demonstrably can fail.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
STEPS = 40


def _load_example():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def one_thread():
    """Correctness, not speed, is tested here: one intra-op thread keeps these small runs quick
    even on a busy 2-core machine (2 OpenMP threads stall at every barrier when a core is taken)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(example, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("digits")
    summary = example.main(["--steps", str(STEPS), "--out", str(out), "--no-calibration"])
    assert summary["args"]["lr"] == example.DEFAULTS["lr"]
    return out, summary


def test_curves_overlap(example, run):
    _out, s = run
    lr = example.DEFAULTS["lr"]
    a, b = s["losses"]["torch.optim.AdamW"], s["losses"]["fusedopt.AdamW"]
    assert len(a) == len(b) == STEPS
    assert s["max_abs_loss_diff"] == max(abs(x - y) for x, y in zip(a, b))
    assert s["max_abs_loss_diff"] < TOL
    assert s["max_abs_param_diff"] < 1e-5
    # it actually trained, through the whole warmup-cosine schedule
    assert b[-1] < 0.5 * b[0]
    assert s["lrs"][0] == pytest.approx(0.01 * lr) and max(s["lrs"]) == pytest.approx(lr, rel=1e-3)
    assert s["lrs"][-1] < 0.01 * lr
    assert s["calibration_torch_fused_vs_forloop_max_abs_loss_diff"] is None  # --no-calibration
    acc = s["test_acc"]
    assert acc["fusedopt.AdamW"] > 0.8
    assert abs(acc["fusedopt.AdamW"] - acc["torch.optim.AdamW"]) <= 1 / 359 + 1e-9  # at most one test image


def test_outputs_written(run):
    out, s = run
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["max_abs_loss_diff"] == s["max_abs_loss_diff"]
    assert set(saved["median_step_ms"]) == {"torch.optim.AdamW", "fusedopt.AdamW"}
    assert all(v > 0 for v in saved["median_step_ms"].values())
    assert saved["ratio_torch_over_fusedopt"] == pytest.approx(
        saved["median_step_ms"]["torch.optim.AdamW"] / saved["median_step_ms"]["fusedopt.AdamW"])


def test_tolerance_detects_a_small_math_error(example, run, one_thread):
    """A 10% weight-decay error must already break TOL, or the overlap test proves nothing."""
    _out, s = run
    args = example.argparse.Namespace(**example.DEFAULTS)
    args.steps = STEPS
    data = example.load_digits_tensors(args.seed)
    init = example.make_model(args.hidden, args.depth, args.seed).state_dict()

    def wrong_wd(params, lr, weight_decay):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.9 * weight_decay)

    bad = example.train(wrong_wd, data, init, args)
    diff = max(abs(x - y) for x, y in zip(bad["losses"], s["losses"]["torch.optim.AdamW"]))
    assert diff > 3 * TOL
