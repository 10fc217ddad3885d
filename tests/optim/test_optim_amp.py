"""(5) Mixed precision: fusedopt optimizers declare ``_step_supports_amp_scaling = True``, so
``GradScaler.step`` hands them ``grad_scale`` / ``found_inf`` instead of unscaling the grads
itself; torch.optim (fused=False) goes through the scaler's normal unscale-then-maybe-step path.

A tiny float32 model is trained side by side; on steps 0, 1 and 5 an inf is injected into one
grad after backward.  Skipped steps must leave params and every state tensor / step counter of
fusedopt bitwise unchanged; a skipped FIRST step must leave no momentum buffer behind (torch
initialises it with the grad on the first *real* step - a zero or uninitialised buffer would give
a different update).  Scales and final params/state must match torch.

Tolerance: the float32 one (optim_parity_utils.float_tolerance).  The scale is a power of two
(2**16 * 0.5**k), so scaling/unscaling is exact in both paths; the only difference left is the
optimizer's rounding, fed back through the forward pass at the ~1e-7 level.
"""

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    assert_pair_close,
    build_pair,
    is_pristine_adam_state,
    make_gen,
    state_of,
)

DT = torch.float32
INF_STEPS = (0, 1, 5)
STEPS = 14
CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, maximize=True)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
]
IDS = [f"{n}-" + "-".join(f"{k}={v}" for k, v in c.items()) for n, c in CASES]
SHAPES = [(5, 4), (4,), (4, 1), (1,)]


def forward(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def full_snapshot(side):
    out = []
    for p in side.params:
        st = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state_of(side.opt, p).items()}
        out.append((p.detach().clone(), st))
    return out


def assert_unchanged_by_skipped_step(name, side, snap, t):
    for i, (p, (p0, st0)) in enumerate(zip(side.params, snap)):
        assert torch.equal(p.detach(), p0), f"skipped step {t} changed param {i}"
        st = state_of(side.opt, p)
        if not st0:
            # no state before: torch creates none on a skipped step.
            if name == "SGD":
                assert "momentum_buffer" not in st, (
                    f"skipped first step {t} left a momentum_buffer for param {i}: torch would then treat it as "
                    "an existing buffer (buf*momentum + (1-dampening)*grad) instead of initialising it with the grad"
                )
            elif st:  # tolerated: zero-initialised Adam state with step 0 is equivalent to no state
                assert is_pristine_adam_state(st), f"skipped step {t} wrote state of param {i}: {st}"
            continue
        assert set(st) == set(st0), f"skipped step {t} changed the state keys of param {i}"
        for k, v0 in st0.items():
            v = st[k]
            if torch.is_tensor(v0):
                assert torch.equal(v, v0), f"skipped step {t} changed state[{k!r}] of param {i}"
            else:
                assert v == v0


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scaler.step", "unscale_+step"])
@pytest.mark.parametrize("name,ctor", CASES, ids=IDS)
def test_grad_scaler_parity_and_skipped_steps(name, ctor, explicit_unscale, device):
    ref, fo = build_pair(name, [(SHAPES[:2], {}), (SHAPES[2:], {"lr": ctor["lr"] * 0.5})], dtype=DT, device=device, ctor=ctor, seed=7)
    assert fo.opt._step_supports_amp_scaling is True
    scalers = {"ref": torch.amp.GradScaler(device), "fo": torch.amp.GradScaler(device)}
    gen = make_gen(8)
    tr = MagnitudeTracker()
    tr.update(ref)
    for t in range(STEPS):
        x = torch.randn(16, 5, generator=gen).to(device)
        y = torch.randn(16, 1, generator=gen).to(device)
        for key, side in (("ref", ref), ("fo", fo)):
            scaler = scalers[key]
            side.opt.zero_grad()
            loss = ((forward(side.params, x) - y) ** 2).mean()
            scaler.scale(loss).backward()
            if t in INF_STEPS:
                with torch.no_grad():
                    side.params[t % len(side.params)].grad.view(-1)[0] = float("inf")
            if explicit_unscale:
                scaler.unscale_(side.opt)  # e.g. to clip grads before stepping
            snap = full_snapshot(side)
            scaler.step(side.opt)
            scaler.update()
            if t in INF_STEPS:
                assert_unchanged_by_skipped_step(name, side, snap, t)
        assert scalers["fo"].get_scale() == scalers["ref"].get_scale(), f"scale diverged at step {t}"
        tr.update(ref)
        assert_pair_close(ref, fo, DT, f"{name} AMP after step {t}", tracker=tr, tolerate_pristine=True)
    assert scalers["fo"].get_scale() < 2.0**16  # the injected infs did back the scale off
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st:
            assert float(st["step"]) == STEPS - len(INF_STEPS)


@pytest.mark.parametrize("name,ctor", CASES[:1] + CASES[3:4], ids=IDS[:1] + IDS[3:4])
def test_grad_scaler_with_nan_grad(name, ctor, device):
    """A NaN (not only inf) in a grad also makes the step a no-op."""
    _, fo = build_pair(name, [(SHAPES, {})], dtype=DT, device=device, ctor=ctor, seed=7)
    scaler = torch.amp.GradScaler(device)
    x = torch.randn(16, 5, generator=make_gen(1)).to(device)
    for t in range(3):
        fo.opt.zero_grad()
        scaler.scale((forward(fo.params, x) ** 2).mean()).backward()
        if t == 2:
            fo.params[0].grad.view(-1)[3] = float("nan")
        snap = full_snapshot(fo)
        scaler.step(fo.opt)
        scaler.update()
    assert_unchanged_by_skipped_step(name, fo, snap, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,ctor", CASES, ids=IDS)
def test_grad_scaler_cuda_autocast_fp16(name, ctor):
    """Smoke test of the real CUDA recipe: autocast fp16 forward, float32 params,
    GradScaler('cuda').  The two runs differ by optimizer rounding (~1e-7), which the fp16 forward
    pass can turn into grad differences of up to eps_fp16 ~ 1e-3 relative in single elements, so
    params are only compared at 1e-3 (rtol and atol; params are O(1)).  The exact skipped-step and
    parity checks run on CUDA in test_grad_scaler_parity_and_skipped_steps (float32 forward)."""
    ref, fo = build_pair(name, [(SHAPES, {})], dtype=DT, device="cuda", ctor=ctor, seed=7)
    scalers = [torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")]
    gen = make_gen(8)
    for t in range(10):
        x = torch.randn(16, 5, generator=gen).cuda()
        for side, scaler in zip((ref, fo), scalers):
            side.opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = (forward(side.params, x) ** 2).mean()
            scaler.scale(loss).backward()
            if t in INF_STEPS:
                side.params[0].grad.view(-1)[0] = float("inf")
            scaler.step(side.opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
    for pr, pf in zip(ref.params, fo.params):
        torch.testing.assert_close(pf, pr, rtol=1e-3, atol=1e-3)
