#!/usr/bin/env python
"""Train the same MLP on scikit-learn's digits twice: torch.optim.AdamW vs fusedopt.AdamW.

Both runs start from the same initial weights, see the same mini-batches in the same order
and follow the same warmup-cosine learning-rate schedule (torch's SequentialLR of LinearLR and
CosineAnnealingLR). fusedopt.AdamW implements exactly torch's AdamW update, so the two loss
curves must lie on top of each other: the script prints the largest absolute difference
between them (only floating-point rounding separates them), plus the time per optimizer step
of each and the ratio. Everything is local: the digits data ships inside scikit-learn.

    python examples/train_digits.py                       # ~30-35 s on 2 idle CPU cores
    python examples/train_digits.py --steps 200 --out /tmp/digits

Writes OUT/loss_curves.png (both curves, and their difference) and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

DEFAULTS = dict(steps=1000, batch_size=128, hidden=512, depth=3, lr=1e-3, weight_decay=0.05,
                warmup_frac=0.1, seed=0)


def load_digits_tensors(seed: int):
    """(X_train, y_train, X_test, y_test): 8x8 digits scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(hidden: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int):
    warmup = max(1, min(warmup, steps - 1))
    return torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps - warmup), eta_min=0.0)],
        milestones=[warmup],
    )


def train(opt_cls, data, init_state: dict, args) -> dict:
    """One training run; returns per-step losses, per-step optimizer.step() times, test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    model = make_model(args.hidden, args.depth, args.seed)
    model.load_state_dict(init_state)
    opt = opt_cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = warmup_cosine(opt, args.steps, int(args.warmup_frac * args.steps))
    gen = torch.Generator().manual_seed(args.seed + 1)  # identical batch order in both runs
    order = torch.randperm(len(x_tr), generator=gen)
    pos = 0
    losses, step_ms, lrs = [], [], []
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(args.steps):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        loss = loss_fn(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"losses": losses, "step_ms": step_ms, "lrs": lrs, "test_acc": acc,
            "params": [p.detach().clone() for p in model.parameters()]}


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (name_a, a), (name_b, b) = runs.items()
    steps = range(1, len(a["losses"]) + 1)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1.3], layout="constrained")
    ax.plot(steps, a["losses"], color="#1f77b4", lw=2.4, alpha=0.6, label=f"{name_a} (test acc {a['test_acc']:.3f})")
    ax.plot(steps, b["losses"], color="#d62728", lw=1.0, ls="--", label=f"{name_b} (test acc {b['test_acc']:.3f})")
    ax.set_yscale("log")
    ax.set_ylabel("training loss (mini-batch)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    diff = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    ax2.plot(steps, [max(d, 1e-12) for d in diff], color="0.3", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("|loss difference|\n(0 drawn at 1e-12)", fontsize=9)
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps per run (default %(default)s)")
    p.add_argument("--out", default="out/train_digits", help="output directory (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="MLP width (default %(default)s)")
    p.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="hidden layers (default %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup-frac", type=float, default=DEFAULTS["warmup_frac"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the third run (torch's fused AdamW) that shows how far pure rounding "
                        "differences alone move the loss curve")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2")

    try:
        import fusedopt
    except ImportError:  # run from a source checkout without `pip install -e .`
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import fusedopt

    t_start = time.perf_counter()
    data = load_digits_tensors(args.seed)
    init_state = {k: v.clone() for k, v in make_model(args.hidden, args.depth, args.seed).state_dict().items()}
    n_params = sum(v.numel() for v in init_state.values())
    print(f"digits: {len(data[0])} train / {len(data[2])} test; MLP 64-{'-'.join([str(args.hidden)] * args.depth)}-10 "
          f"({n_params:,} params); {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g} "
          f"wd {args.weight_decay:g}, warmup {args.warmup_frac:.0%} + cosine; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    runs = {}
    for name, cls in (("torch.optim.AdamW", torch.optim.AdamW), ("fusedopt.AdamW", fusedopt.AdamW)):
        t0 = time.perf_counter()
        runs[name] = train(cls, data, init_state, args)
        print(f"  {name:18s} final loss {runs[name]['losses'][-1]:.5f}  test acc {runs[name]['test_acc']:.4f}  "
              f"({time.perf_counter() - t0:.1f} s)")
    calib = calib_ms = None
    if not args.no_calibration:
        t0 = time.perf_counter()
        fused = train(functools.partial(torch.optim.AdamW, fused=True), data, init_state, args)
        calib = max(abs(x - y) for x, y in zip(runs["torch.optim.AdamW"]["losses"], fused["losses"]))
        calib_ms = statistics.median(fused["step_ms"][min(10, args.steps // 10):])
        print(f"  (calibration run: torch.optim.AdamW(fused=True): same math, other rounding; "
              f"{time.perf_counter() - t0:.1f} s)")
    (na, a), (nb, b) = runs.items()
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    max_diff = max(diffs)
    max_rel = max(d / max(abs(x), 1e-12) for d, x in zip(diffs, a["losses"]))
    param_diff = max((pa - pb).abs().max().item() for pa, pb in zip(a["params"], b["params"]))
    skip = min(10, args.steps // 10)  # first steps include one-off state allocation
    med = {n: statistics.median(r["step_ms"][skip:]) for n, r in runs.items()}
    mean = {n: statistics.fmean(r["step_ms"][skip:]) for n, r in runs.items()}
    print(f"loss curves: max |difference| over {args.steps} steps = {max_diff:.3e} "
          f"(max relative {max_rel:.3e}); max |param difference| at the end = {param_diff:.3e}")
    if calib is not None:
        print(f"  for scale, torch's own fused vs for-loop AdamW (same math, different rounding): "
              f"max |difference| = {calib:.3e}")
    for n in runs:
        print(f"time per optimizer step, {n:18s}: median {med[n]:.3f} ms, mean {mean[n]:.3f} ms")
    ratio = med[na] / med[nb]
    print(f"ratio torch / fusedopt (median step time): {ratio:.2f}x "
          f"({'fusedopt faster' if ratio > 1 else 'torch faster'})")
    if calib is not None:
        print(f"  (for reference, torch.optim.AdamW(fused=True): median {calib_ms:.3f} ms; "
              f"torch fused / fusedopt = {calib_ms / med[nb]:.2f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "loss_curves.png"
    plot(runs, png, f"digits MLP ({n_params:,} params), AdamW + warmup-cosine: torch vs fusedopt\n"
                    f"max |loss diff| {max_diff:.2e}; optimizer step {med[na]:.2f} ms vs {med[nb]:.2f} ms "
                    f"({ratio:.2f}x)")
    summary = {
        "args": vars(args), "n_params": n_params, "max_abs_loss_diff": max_diff, "max_rel_loss_diff": max_rel,
        "max_abs_param_diff": param_diff,
        "calibration_torch_fused_vs_forloop_max_abs_loss_diff": calib,
        "calibration_torch_fused_median_step_ms": calib_ms, "median_step_ms": med, "mean_step_ms": mean,
        "ratio_torch_over_fusedopt": ratio, "test_acc": {n: r["test_acc"] for n, r in runs.items()},
        "losses": {n: r["losses"] for n, r in runs.items()}, "lrs": a["lrs"],
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {png} and {out / 'summary.json'} ({summary['wall_s']:.1f} s)")
    return summary


if __name__ == "__main__":
    main()
