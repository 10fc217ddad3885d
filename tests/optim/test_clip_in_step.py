"""Fused gradient clipping: ``max_grad_norm`` / ``grad_norm_type`` on every fusedopt optimizer.

Specification (the issue): ``fusedopt.X(..., max_grad_norm=M, grad_norm_type=p)`` steps exactly like
``torch.nn.utils.clip_grad_norm_(all params with grads, M, p)`` followed by ``step()``: ONE global
norm over every param the optimizer steps (not one per group), coefficient ``M / (norm + 1e-6)``
clamped to 1 in float32 (float64 as soon as a grad is float64, as torch's total norm then is),
computed on the *unscaled* grads when a GradScaler drives the step. ``optimizer.grad_norm`` is the
last step's total norm (before clipping), a 0-dim float32 (or float64) tensor on the params' device
(None before the first clipped step).  A non-finite norm skips the step like a
GradScaler skip (params, state and step counters unchanged; no momentum buffer is created by a
skipped first step) and ``grad_norm`` shows the non-finite value.  The clipped grads are NOT
written back: p.grad after step() holds the unclipped grads (unscaled in place under a GradScaler).
``optimizer.max_grad_norm`` may be changed (or set to None) between steps.  Each step is exactly two
fused op calls per device: ``fusedopt::grad_norm_`` then ``fusedopt::step_``.

Oracles.  SGD / Adam / AdamW / RMSprop / Adagrad: ``clip_grad_norm_(..., foreach=False)`` then
``torch.optim.X(foreach=False)`` - and the oracle skips its step exactly when torch's returned norm
is not finite (the specified behaviour; torch itself would write NaNs).  Lion has no torch.optim
class: every step is checked against the paper's rule in float64 (new_optim_utils.assert_lion_step)
fed with the *ideally* clipped grads - g (float64) times the coefficient computed from the exact
float64 norm rounded once to float32 (``ideal_clip``) - and its ``grad_norm`` against torch's
``get_total_norm``.  For p other than 2 and inf, torch's own float32 norm is off by up to ~4e-6
(NORM_RTOL), so there the torch optimizers are fed the ideally clipped grads too.  Every norm is
also checked against the exact float64 norm (1 float32 ulp).

Data.  Fresh seeded random grads every step, multiplied by a random power of two 2**k, k in
[-3, 2] (exact in every dtype), with ``max_grad_norm`` = 1.5x the norm of an unscaled draw: about
a third of the steps are clipped, two thirds are not (each test asserts that both happened).

Tolerances (arguments next to each constant below):
  * params / state, float32, whole runs: optim_parity_utils.float_tolerance (1e-6 relative, atol
    1e-6 * largest magnitude along the run).  Clipping adds one coefficient per step that differs
    between torch and fusedopt by a few float32 ulps (the norms differ by a few ulps, see
    NORM_RTOL; torch then rounds twice more: 1/(n + 1e-6), * M).  That is a relative error of
    <= ~8 eps = 1e-6 on that step's (clipped) grads, random in sign from step to step, so it is
    "a few eps of the update" of float_tolerance's argument and random-walks like the other
    roundings: the params' error stays at ~1e-7 of the distance they travelled.
  * bfloat16: per step from the re-synced float32 oracle, optim_parity_utils.assert_half_step_close
    (2 ulp bf16 + 64 eps_f32 * |change|): the coefficient difference is <= ~8 eps_f32 relative on
    the grad, i.e. <= ~8 eps_f32 * |change| of any state / param (all updates are Lipschitz in g
    with constant ~1 relative to the change), well inside the 64 eps_f32 * |change| term.
  * Lion: assert_lion_step's per-step tolerance (its docstring): the ideal clipped grad differs
    from fusedopt's float32 g * coef by <= 1.5 ulp (coef one rounding, the product one more),
    inside its 4 eps_c * |operand| term.
  * grad_norm: NORM_RTOL (below).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter

import pytest
import torch
import fusedopt

from optim_parity_utils import (
    RecordFusedOps,
    op_device,
    MagnitudeTracker,
    Side,
    assert_half_pair_step,
    copy_hparams,
    draw,
    draw_like,
    half_snapshot,
    make_gen,
    resync_oracle,
    state_of,
    step_value,
    ulp,
)
from new_optim_utils import (
    assert_lion_step,
    assert_pair_close_any,
    build_pair,
    fused_cls,
    is_pristine_state,
    lion_step_count_ok,
)

INF = math.inf
NAMES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion")
STEPS = 100  # cpu / cuda
EMUL_STEPS = 50  # the emulated CUDA kernels run on CPU threads: slower

# ctor + two more groups with other hyperparameters (the norm is global over all three groups)
CASES = {
    "SGD": (dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
            dict(lr=0.02, nesterov=True, dampening=0.0), dict(lr=0.1, momentum=0.0)),
    "Adam": (dict(lr=1e-2, weight_decay=0.01), dict(lr=2e-2, amsgrad=True, betas=(0.8, 0.99)),
             dict(maximize=True, eps=1e-3)),
    "AdamW": (dict(lr=1e-2, weight_decay=0.1), dict(lr=5e-3, amsgrad=True), dict(betas=(0.5, 0.9))),
    "RMSprop": (dict(lr=1e-3, momentum=0.9, centered=True),
                dict(momentum=0.0, centered=False, weight_decay=0.01, alpha=0.9), dict(lr=2e-3, maximize=True)),
    "Adagrad": (dict(lr=1e-2, lr_decay=0.01, initial_accumulator_value=0.1), dict(lr=3e-2, weight_decay=0.1),
                dict(eps=1e-2, maximize=True)),
    "Lion": (dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=3e-3, betas=(0.95, 0.98), maximize=True),
             dict(lr=2e-3, weight_decay=0.0)),
}
SHAPES = ([(1,), (4099,)], [(37,), (3, 5, 7)], [(1000,)])
HALF_SHAPES = ([(1,), (37,)], [(3, 5, 7)], [(1000,)])

# grad_norm, two checks.
# (a) Against the exact norm (float64 over the same float32 / bf16 grads): fusedopt accumulates in
#     float64 and rounds once, so it is within 0.5 ulp of float32; a float64 summation-order
#     difference (~n * 1e-16 relative, n ~ 5e3) can only matter at a rounding tie: 1 ulp allowed.
#     This is the sharp check (a float32 accumulation fails it for every p).
# (b) Against torch's returned norm (clip_grad_norm_ / get_total_norm): one float32 norm per
#     tensor, then the norm of those.  p = 2: a sum of n positive squares has no cancellation; its
#     float32 rounding error is <= ~log2(n) eps (vectorised / cascade sums; n <= 4099 -> ~12 eps
#     worst, ~3 eps typical) relative, halved by the sqrt, plus ~2 eps from the second level: worst
#     ~8 eps = 1e-6, typical 1-2 eps (measured: max 1.8e-7 over 30 draws of these shapes).  rtol
#     1e-6 is far below any real error (a tensor or group left out changes the norm by >= 1e-4 here,
#     a per-group norm by ~40%).  p = inf: a max of |x| is exact in every precision: bitwise equal.
#     Other p: torch's float32 reduction of |x|**p is not compensated (measured relative error of
#     torch's norm up to 2.3e-6 for p=1, 3.6e-6 for p=0.5, 9e-7 for p=3 on these shapes, 0.5x-2x
#     its mean * sqrt(#draws)); rtol 1e-5 is 3x that worst case.  For those p the clip coefficient
#     of torch itself is thus off by up to ~4e-6, too much for the 1e-6 param comparison: the
#     oracle there is torch.optim fed with the IDEALLY clipped grads (ideal_clip) instead of
#     clip_grad_norm_'s, which is what the specification means (fusedopt's norm is exact to
#     0.5 ulp, (a)).
NORM_RTOL = {2.0: 1e-6, INF: 0.0, 1.0: 1e-5, 3.0: 1e-5, 0.5: 1e-5}


@pytest.fixture
def n_steps(request):
    return EMUL_STEPS if request.node.get_closest_marker("emulated_cuda") is not None else STEPS


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def groups_of(name, shapes=SHAPES):
    ctor, g1, g2 = CASES[name]
    return dict(ctor), [(shapes[0], {}), (shapes[1], dict(g1)), (shapes[2], dict(g2))]


def build_clip_pair(name, specs, *, dtype, device, ctor, clip, seed=0, ref_dtype=None):
    """(oracle Side, fusedopt Side) over identical params; only fusedopt gets the clip options
    (``clip``: dict(max_grad_norm=..., grad_norm_type=...))."""
    ref, fo0 = build_pair(name, specs, dtype=dtype, device=device, ctor=ctor, seed=seed, ref_dtype=ref_dtype)
    groups, k = [], 0
    for shapes, hp in specs:
        groups.append({"params": fo0.params[k:k + len(shapes)], **copy_hparams(hp)})
        k += len(shapes)
    fo = Side(fused_cls(name)(groups, **copy_hparams(ctor), **clip), fo0.params)
    return ref, fo


def typical_norm(shapes, kind, norm_type):
    """Norm of one unscaled draw of grads over ``shapes`` (the scale of the threshold)."""
    vals = draw([s for group in shapes for s in group], make_gen(99), kind)
    return float(torch.linalg.vector_norm(torch.cat([v.flatten() for v in vals]), norm_type))


def same_bits(a, b):
    """Equal values (NaN == NaN), same dtype / shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_grads_unclipped(fo, grads, what):
    """The fused step reads the grads and scales them by the coefficient on the fly: p.grad
    after step() is what it was before (never the clipped grad)."""
    for i, (p, g) in enumerate(zip(fo.params, grads, strict=True)):
        if g is None:
            assert p.grad is None, f"{what}: param {i} had no grad, step() gave it one"
            continue
        assert p.grad is not None and same_bits(p.grad, g), (
            f"{what}: step() changed p.grad of param {i} (clipped grads must not be written back)")


def full_snapshot(side):
    out = []
    for p in side.params:
        st = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state_of(side.opt, p).items()}
        out.append((p.detach().clone(), st))
    return out


def assert_changed_nothing(name, side, snap, what):
    """A skipped step (non-finite norm or GradScaler inf): params, state tensors and step
    counters bitwise unchanged; no momentum buffer created; at most a pristine (all-zero,
    step 0) state where there was none - equivalent to none, as test_optim_amp tolerates."""
    for i, (p, (p0, st0)) in enumerate(zip(side.params, snap)):
        assert torch.equal(p.detach(), p0), f"{what}: skipped step changed param {i}"
        st = state_of(side.opt, p)
        if not st0:
            if name == "SGD":
                assert "momentum_buffer" not in st, (
                    f"{what}: skipped step left a momentum_buffer for param {i}; torch initialises it with "
                    "the grad on the first real step (a zero buffer gives a different update)")
            elif st:
                assert is_pristine_state(name, st), f"{what}: skipped step wrote state of param {i}: {sorted(st)}"
            continue
        assert set(st) == set(st0), f"{what}: skipped step changed the state keys of param {i}"
        for k, v0 in st0.items():
            if torch.is_tensor(v0):
                assert torch.equal(st[k], v0), f"{what}: skipped step changed state[{k!r}] of param {i}"
            else:
                assert st[k] == v0, f"{what}: skipped step changed state[{k!r}] of param {i}"


def check_grad_norm(opt, expected, norm_type, device, what, rtol=None, grads=None):
    """opt.grad_norm: a 0-dim float32 tensor on the params' device, equal to ``expected`` (torch's
    norm) within NORM_RTOL (or ``rtol``); non-finite exactly when torch's is (NaN when torch's is
    NaN); and, given the ``grads`` it was computed from, within 1 float32 ulp of their exact norm."""
    gn = opt.grad_norm
    assert torch.is_tensor(gn), f"{what}: grad_norm is {type(gn).__name__}, expected a tensor"
    assert gn.dim() == 0 and gn.dtype == torch.float32, f"{what}: grad_norm {gn.dtype} shape {tuple(gn.shape)}"
    assert gn.device.type == torch.device(device).type, f"{what}: grad_norm on {gn.device}, params on {device}"
    got, exp = float(gn), float(expected)
    if not math.isfinite(exp):
        assert not math.isfinite(got), f"{what}: grad_norm {got}, torch's norm {exp} (must be non-finite)"
        assert math.isnan(got) == math.isnan(exp), f"{what}: grad_norm {got}, torch's norm {exp}"
        return
    rt = NORM_RTOL[float(norm_type)] if rtol is None else rtol
    assert abs(got - exp) <= rt * abs(exp), f"{what}: grad_norm {got!r} vs torch {exp!r} (rtol {rt}, rel err {abs(got - exp) / exp:.3g})"
    if grads is not None:
        exact = exact_norm(grads, norm_type)
        tol = float(ulp(torch.tensor(exact), torch.float32))
        assert abs(got - exact) <= tol, (
            f"{what}: grad_norm {got!r} is {abs(got - exact) / tol:.3g} float32 ulps from the exact norm {exact!r} "
            "(float64 accumulation rounded once: <= 0.5 ulp)")


def exact_norm(grads, norm_type):
    return float(torch.linalg.vector_norm(
        torch.cat([g.detach().cpu().to(torch.float64).flatten() for g in grads if g is not None]), norm_type))


def torch_total_norm(grads, norm_type):
    """torch's total norm (clip_grad_norm_'s) of float32 copies of the grads."""
    gs = [g.detach().to(torch.float32) for g in grads if g is not None]
    return torch.nn.utils.get_total_norm(gs, norm_type, foreach=False)


def ideal_clip(grads, max_norm, norm_type):
    """(finite?, clipped grads in float64): norm exact in float64 rounded once to float32, the
    coefficient max_norm / (norm + 1e-6) clamped to 1 and rounded once to float32."""
    g64 = [None if g is None else g.detach().to(torch.float64) for g in grads]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in g64 if g is not None]), norm_type)
    n32 = float(norm.to(torch.float32))
    if not math.isfinite(n32):
        return False, None
    coef = float(torch.tensor(min(1.0, max_norm / (n32 + 1e-6)), dtype=torch.float32))
    return True, [None if g is None else g * coef for g in g64]


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
def run_clip(name, *, dtype, device, steps, norm_type=2.0, rel_max=1.5, seed=1234, shapes=None,
             nonfinite=None, schedule=None, grad_mask_fn=None, check_every=10, check_regimes=True, oracle=None):
    """fusedopt with max_grad_norm vs clip_grad_norm_ + torch.optim (Lion: the paper's rule fed
    with ideally clipped grads), ``steps`` steps of fresh grads times a random 2**k.

    rel_max: max_grad_norm = rel_max * typical_norm.  nonfinite: {step: (param index, value)} puts a
    NaN / inf into that grad.  schedule: {step: rel_max or None} sets ``fo.opt.max_grad_norm``
    before that step.  oracle: "torch" (clip_grad_norm_; the default for p = 2 and inf) or "ideal"
    (ideal_clip's grads; the default for other p, see NORM_RTOL).  Returns (ref, fo, Counter of
    clipped / unclipped / skipped steps)."""
    if oracle is None:
        oracle = "torch" if norm_type in (2.0, INF) else "ideal"
    half = dtype in (torch.bfloat16, torch.float16)
    kind = "half" if half else "normal"
    shapes = shapes or (HALF_SHAPES if half else SHAPES)
    ctor, specs = groups_of(name, shapes)
    typical = typical_norm(shapes, kind, norm_type)
    cur = rel_max * typical
    ref, fo = build_clip_pair(name, specs, dtype=dtype, device=device, ctor=ctor, seed=seed,
                              clip=dict(max_grad_norm=cur, grad_norm_type=norm_type),
                              ref_dtype=torch.float32 if half else None)
    assert fo.opt.max_grad_norm == cur and fo.opt.grad_norm_type == norm_type
    assert fo.opt.grad_norm is None, "grad_norm must be None before the first clipped step"
    lion = name == "Lion"
    gen = make_gen(seed + 1)
    tracker = MagnitudeTracker()
    tracker.update(ref)
    seen = Counter()
    n = len(fo.params)
    for t in range(1, steps + 1):
        what = f"{name} {dtype} {device} p={norm_type} step {t}"
        if schedule and t in schedule:
            cur = None if schedule[t] is None else schedule[t] * typical
            fo.opt.max_grad_norm = cur
        if half and not lion:
            resync_oracle(ref, fo)
        before = half_snapshot(fo) if half else None
        if before is not None:
            before = {i: {k: (v.to(torch.float32) if torch.is_tensor(v) else v) for k, v in d.items()}
                      for i, d in before.items()}
        lion_before = lion_snapshot_any(fo) if lion else None

        # ---- the same grads for both sides
        mask = grad_mask_fn(t, n) if grad_mask_fn else [True] * n
        scale = 2.0 ** int(torch.randint(-3, 3, (), generator=gen))
        grads = []
        for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
            v = draw_like([tuple(pf.shape)], pf.dtype, gen, kind)[0] * scale
            if not mask[i]:
                pr.grad = pf.grad = None
                grads.append(None)
                continue
            g = v.to(device=pf.device, dtype=pf.dtype)
            if nonfinite and t in nonfinite and nonfinite[t][0] == i:
                g.view(-1)[g.numel() // 2] = nonfinite[t][1]
            pf.grad = g.clone()
            pr.grad = g.to(pr.dtype).clone()
            grads.append(g.clone())

        # ---- oracle
        skip = False
        expected_norm = None
        if lion:
            clipped = [None if g is None else g.to(torch.float64) for g in grads]
            if cur is not None:
                expected_norm = torch_total_norm(grads, norm_type)
                finite, clipped = ideal_clip(grads, cur, norm_type)
                skip = not finite
        else:
            if cur is not None and oracle == "torch":
                expected_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in ref.params if p.grad is not None], cur, norm_type, foreach=False)
                skip = not bool(torch.isfinite(expected_norm))
            elif cur is not None:
                expected_norm = torch_total_norm(grads, norm_type)
                finite, clipped = ideal_clip(grads, cur, norm_type)
                skip = not finite
                if finite:
                    for pr, g in zip(ref.params, clipped):
                        pr.grad = None if g is None else g.to(pr.dtype)
            if not skip:
                ref.step()

        snap = full_snapshot(fo) if skip else None
        fo.step()

        # ---- checks
        assert_grads_unclipped(fo, grads, what)
        if cur is not None:
            check_grad_norm(fo.opt, expected_norm, norm_type, device, what, grads=grads)
            if skip:
                seen["skipped"] += 1
            else:
                seen["clipped" if float(expected_norm) > cur else "unclipped"] += 1
        if skip:
            assert_changed_nothing(name, fo, snap, what)
            continue
        tracker.update(ref)
        if lion:
            assert_lion_step(fo, lion_before, clipped, dtype, what)
        elif half:
            assert_half_pair_step(ref, fo, before, dtype, what)
        elif (t == 1 or t % check_every == 0 or t == steps or (nonfinite and t - 1 in nonfinite)
              or (schedule and t in schedule)):
            assert_pair_close_any(name, ref, fo, dtype, what, tracker=tracker, tolerate_pristine=name != "SGD")
    if check_regimes:
        # test sanity: the data really exercised both sides of the threshold
        assert seen["clipped"] >= steps // 10 and seen["unclipped"] >= steps // 10, f"test data: {dict(seen)}"
    return ref, fo, seen


def lion_snapshot_any(fo):
    """lion_snapshot, also before the first step (no exp_avg yet: m0 = 0)."""
    return [(p.detach().clone(), state_of(fo.opt, p)["exp_avg"].detach().clone() if "exp_avg" in state_of(fo.opt, p)
             else None) for p in fo.params]


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
FP32_CASES = [(n, 2.0) for n in NAMES] + [(n, INF) for n in ("SGD", "AdamW", "RMSprop", "Lion")]


@pytest.mark.parametrize("name,norm_type", FP32_CASES, ids=[f"{n}-{'inf' if p == INF else 'l2'}" for n, p in FP32_CASES])
def test_float32_parity_with_clip_grad_norm(name, norm_type, device, n_steps):
    """100 steps (50 emulated), three param groups with different hyperparameters, grads above and
    below the threshold: params / state as clip_grad_norm_ + torch.optim, grad_norm as torch's norm,
    p.grad left unclipped."""
    _, fo, _ = run_clip(name, dtype=torch.float32, device=device, steps=n_steps, norm_type=norm_type)
    if name == "Lion":
        for p in fo.params:
            lion_step_count_ok(fo, p, n_steps, "Lion")


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parity_per_step(name, device, n_steps):
    """bf16 params: each step against the float32 oracle re-synced to fusedopt's state
    (assert_half_step_close); the norm is of the bf16 grads (upcast exactly for torch)."""
    run_clip(name, dtype=torch.bfloat16, device=device, steps=n_steps)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_bfloat16_parity_inf_norm(name, device, n_steps):
    run_clip(name, dtype=torch.bfloat16, device=device, steps=n_steps, norm_type=INF)


P_CASES = [("SGD", 1.0), ("SGD", 0.5), ("Adam", 3.0), ("Adam", 1.0), ("Lion", 0.5)]


@pytest.mark.parametrize("name,norm_type", P_CASES, ids=[f"{n}-p{p}" for n, p in P_CASES])
def test_other_p_norms(name, norm_type, device, n_steps):
    """Any p > 0 is torch's vector_norm of order p (tolerance NORM_RTOL[p])."""
    run_clip(name, dtype=torch.float32, device=device, steps=n_steps // 2, norm_type=norm_type)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_norm_is_over_params_with_grads_only(name, device, n_steps):
    """Some params have no grad on some steps: the norm covers the params with grads (like
    clip_grad_norm_ over them) and the others are not stepped."""
    mask = lambda t, n: [(t + i) % 3 != 0 for i in range(n)]  # noqa: E731
    run_clip(name, dtype=torch.float32, device=device, steps=n_steps // 2, grad_mask_fn=mask, check_every=1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "Lion"])
def test_changing_max_grad_norm_between_steps(name, device, n_steps):
    """optimizer.max_grad_norm edited between steps takes effect at the next step: a much smaller
    threshold (every step clipped), None (no clipping: plain torch.optim steps), then a threshold
    again."""
    q = n_steps // 4
    _, _, seen = run_clip(name, dtype=torch.float32, device=device, steps=n_steps,
                          schedule={q: 0.05, 2 * q: None, 3 * q: 1.5}, check_every=5, check_regimes=False)
    assert seen["clipped"] >= q and seen["unclipped"] >= 5, dict(seen)


def test_grad_norm_none_until_clipping_is_switched_on(device):
    import fusedopt

    ps = [torch.randn(37, generator=make_gen(1)).to(device).requires_grad_(), torch.randn(5, 3).to(device).requires_grad_()]
    opt = fusedopt.Adam(ps, lr=1e-3)
    assert opt.max_grad_norm is None and opt.grad_norm_type == 2.0 and opt.grad_norm is None
    for p in ps:
        p.grad = torch.randn(p.shape, generator=make_gen(2)).to(device)
    opt.step()
    assert opt.grad_norm is None, "no max_grad_norm: no norm computed"
    opt.max_grad_norm = 1.0
    opt.step()
    expected = torch_total_norm([p.grad for p in ps], 2.0)
    check_grad_norm(opt, expected, 2.0, device, "after switching clipping on", grads=[p.grad for p in ps])


# --------------------------------------------------------------------------------------------
# non-finite norms without a GradScaler
# --------------------------------------------------------------------------------------------
# step 1 (the FIRST step: no state yet), later a NaN, an inf and a -inf
NONFINITE = {1: (1, float("nan")), 7: (3, float("inf")), 8: (0, float("nan")), 15: (4, float("-inf"))}


NONFINITE_CASES = [(n, 2.0) for n in NAMES] + [("SGD", INF), ("Adam", INF)]


@pytest.mark.parametrize("name,norm_type", NONFINITE_CASES,
                         ids=[f"{n}-{'inf' if p == INF else 'l2'}" for n, p in NONFINITE_CASES])
def test_non_finite_norm_skips_the_step(name, norm_type, device):
    """A NaN / inf grad (no GradScaler): the norm is non-finite, the step changes nothing (params,
    state, step counters; a skipped first step creates no SGD momentum buffer), grad_norm is
    non-finite (NaN for a NaN grad, as torch's norm - also for p = inf), and the following steps
    go on like torch.optim that skipped those steps."""
    _, fo, seen = run_clip(name, dtype=torch.float32, device=device, steps=24, norm_type=norm_type,
                           nonfinite=NONFINITE, check_regimes=False)
    assert seen["skipped"] == len(NONFINITE), dict(seen)
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st and name != "Lion":
            assert step_value(st["step"]) == 24 - len(NONFINITE)
        elif name == "Lion":
            lion_step_count_ok(fo, p, 24 - len(NONFINITE), "Lion")


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_first_step_non_finite_leaves_no_momentum_buffer(momentum, device):
    import fusedopt

    p = torch.randn(37, generator=make_gen(3)).to(device).requires_grad_()
    q = p.detach().clone().requires_grad_()
    opt = fusedopt.SGD([p], lr=0.1, momentum=momentum, max_grad_norm=1.0)
    ref = torch.optim.SGD([q], lr=0.1, momentum=momentum, foreach=False)
    g = torch.randn(37, generator=make_gen(4)).to(device)
    p.grad = g.clone()
    p.grad[5] = float("nan")
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), p0)
    assert "momentum_buffer" not in state_of(opt, p), f"state after a skipped first step: {sorted(state_of(opt, p))}"
    assert math.isnan(float(opt.grad_norm))
    # the next (real) step is torch's first step: buffer = clipped grad
    for _ in range(3):
        p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_([q], 1.0, foreach=False)
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
    if momentum:
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# GradScaler
# --------------------------------------------------------------------------------------------
AMP_DT = torch.float32
AMP_SHAPES = [(5, 4), (4,), (4, 1), (1,)]
AMP_INF_STEPS = (0, 1, 6)
AMP_STEPS = 20
AMP_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01)),
    ("Lion", dict(lr=0.01, weight_decay=0.1)),
]
AMP_MAX_NORM = 4.0  # the loss multiplier 2**k spreads the norms over ~0.5 .. 20
# grad_norm vs torch's norm of the ORACLE's unscaled grads: the two models' params agree to the
# float32 run tolerance (~1e-7 .. 1e-6 relative), and the grads of this smooth tanh MLP inherit
# that (the loss is a polynomial / tanh of the params: relative grad error ~ relative param error
# times a condition factor of O(1-10)); 1e-5 leaves a 10x margin.  Against the norm of
# fusedopt's OWN unscaled grads the tolerance is NORM_RTOL[2] (same numbers).
AMP_NORM_RTOL_CROSS = 1e-5


def forward(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1 + b1) @ w2 + b2


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scaler.step", "unscale_+step"])
@pytest.mark.parametrize("name,ctor", AMP_CASES, ids=[n for n, _ in AMP_CASES])
def test_grad_scaler(name, ctor, explicit_unscale, device):
    """A real torch.amp.GradScaler on a tiny float32 model, infs injected on steps 0, 1, 6.
    Oracle: scaler.unscale_, clip_grad_norm_, scaler.step(torch.optim).  fusedopt: scaler.step
    alone (it gets grad_scale / found_inf and clips the unscaled grads in the kernel) or after an
    explicit unscale_.  Skipped steps change nothing; the norm is the unscaled grads' norm; after a
    real step p.grad is the unscaled, unclipped grad (the scale is a power of two: exact)."""
    specs = [(AMP_SHAPES[:2], {}), (AMP_SHAPES[2:], {"lr": ctor["lr"] * 0.5})]
    ref, fo = build_clip_pair(name, specs, dtype=AMP_DT, device=device, ctor=ctor, seed=7,
                              clip=dict(max_grad_norm=AMP_MAX_NORM))
    scalers = {"ref": torch.amp.GradScaler(device), "fo": torch.amp.GradScaler(device)}
    gen = make_gen(8)
    tr = MagnitudeTracker()
    tr.update(ref)
    seen = Counter()
    for t in range(AMP_STEPS):
        x = torch.randn(16, 5, generator=gen).to(device)
        y = torch.randn(16, 1, generator=gen).to(device)
        mult = 2.0 ** int(torch.randint(-3, 3, (), generator=gen))  # norms above and below the threshold
        what = f"{name} AMP step {t}"
        for key, side in (("ref", ref), ("fo", fo)):
            scaler = scalers[key]
            side.opt.zero_grad()
            loss = ((forward(side.params, x) - y) ** 2).mean() * mult
            scaler.scale(loss).backward()
            if t in AMP_INF_STEPS:
                with torch.no_grad():
                    side.params[t % len(side.params)].grad.view(-1)[0] = float("inf")
            if key == "ref":
                scaler.unscale_(side.opt)
                ref_norm = torch.nn.utils.clip_grad_norm_(side.params, AMP_MAX_NORM, foreach=False)
                scaler.step(side.opt)
                scaler.update()
                continue
            inv_scale = 1.0
            if explicit_unscale:
                scaler.unscale_(side.opt)
            else:
                inv_scale = 1.0 / scaler.get_scale()
            grads_in = [p.grad.detach().clone() for p in side.params]
            snap = full_snapshot(side)
            scaler.step(side.opt)
            scaler.update()
            if t in AMP_INF_STEPS:
                assert_changed_nothing(name, side, snap, what)
                assert not math.isfinite(float(side.opt.grad_norm)), f"{what}: grad_norm {float(side.opt.grad_norm)}"
                seen["skipped"] += 1
                continue
            for i, (p, g) in enumerate(zip(side.params, grads_in)):
                assert torch.equal(p.grad, g * inv_scale), f"{what}: p.grad of param {i} is not the unscaled, unclipped grad"
            check_grad_norm(side.opt, torch_total_norm([p.grad for p in side.params], 2.0), 2.0, device,
                            f"{what} (own grads)", grads=[p.grad for p in side.params])
            check_grad_norm(side.opt, ref_norm, 2.0, device, f"{what} (oracle's grads)", rtol=AMP_NORM_RTOL_CROSS)
            seen["clipped" if float(ref_norm) > AMP_MAX_NORM else "unclipped"] += 1
        assert scalers["fo"].get_scale() == scalers["ref"].get_scale(), f"scale diverged at step {t}"
        tr.update(ref)
        assert_pair_close_any(name, ref, fo, AMP_DT, f"{what}", tracker=tr, tolerate_pristine=name != "SGD")
    assert seen["skipped"] == len(AMP_INF_STEPS)
    assert seen["clipped"] >= 3 and seen["unclipped"] >= 3, f"test data: {dict(seen)}"
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st:
            assert step_value(st["step"]) == AMP_STEPS - len(AMP_INF_STEPS)


# --------------------------------------------------------------------------------------------
# constructor
# --------------------------------------------------------------------------------------------
def _params():
    return [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]


@pytest.mark.parametrize("name", NAMES)
def test_clip_options_are_keyword_only_with_defaults(name):
    sig = inspect.signature(fused_cls(name).__init__).parameters
    K = inspect.Parameter.KEYWORD_ONLY
    assert sig["max_grad_norm"].kind == K and sig["max_grad_norm"].default is None
    assert sig["grad_norm_type"].kind == K and sig["grad_norm_type"].default == 2.0
    opt = fused_cls(name)(_params())
    assert opt.max_grad_norm is None and opt.grad_norm_type == 2.0 and opt.grad_norm is None


@pytest.mark.parametrize("kwargs", [dict(max_grad_norm=0.0), dict(max_grad_norm=0), dict(max_grad_norm=-1.0),
                                    dict(max_grad_norm=1.0, grad_norm_type=0.0), dict(grad_norm_type=-2.0),
                                    dict(max_grad_norm=1.0, grad_norm_type=-INF)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("name", NAMES)
def test_invalid_clip_options_raise_value_error(name, kwargs):
    with pytest.raises(ValueError):
        fused_cls(name)(_params(), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(max_grad_norm=1.0), dict(max_grad_norm=2, grad_norm_type=INF),
                                    dict(max_grad_norm=0.5, grad_norm_type=1.0), dict(max_grad_norm=1e-3, grad_norm_type=0.5)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("name", NAMES)
def test_valid_clip_options_are_accepted(name, kwargs):
    opt = fused_cls(name)(_params(), **kwargs)
    assert opt.max_grad_norm == kwargs["max_grad_norm"]
    assert opt.grad_norm_type == kwargs.get("grad_norm_type", 2.0)


# --------------------------------------------------------------------------------------------
# the fused-op contract: grad_norm_ then step_, once each per device per step; opcheck
# --------------------------------------------------------------------------------------------



# name, ctor, group-1 hyperparameters, dtype, norm_type, GradScaler
OP_SCENARIOS = {
    "adam-groups-l2": ("Adam", dict(lr=1e-2, weight_decay=0.1), {"amsgrad": True, "lr": 0.02}, torch.float32, 2.0, False),
    "sgd-momentum-bf16-inf": ("SGD", dict(lr=0.1, momentum=0.9), {"momentum": 0.0}, torch.bfloat16, INF, False),
    "rmsprop-l1": ("RMSprop", dict(lr=1e-2, centered=True), {"momentum": 0.5}, torch.float32, 1.0, False),
    "adagrad-amp": ("Adagrad", dict(lr=1e-2), {"lr": 0.02}, torch.float32, 2.0, True),
    "lion-amp-inf": ("Lion", dict(lr=1e-3), {"lr": 2e-3}, torch.float32, INF, True),
    "adamw-bf16": ("AdamW", dict(lr=1e-2), {}, torch.bfloat16, 2.0, False),
}
OPCHECK_SCENARIOS = ["adam-groups-l2", "sgd-momentum-bf16-inf", "lion-amp-inf"]


def record(scenario, device, steps=3):
    """Step 0: fresh state, clipped; step 1: a non-finite grad (found_inf with a GradScaler);
    step 2: a normal step after the skip."""
    name, ctor, extra, dtype, norm_type, amp = OP_SCENARIOS[scenario]
    specs = [([(3,), (2, 5)], {}), ([(7,)], extra)]
    _, fo = build_clip_pair(name, specs, dtype=dtype, device=device, ctor=ctor,
                            clip=dict(max_grad_norm=1.0, grad_norm_type=norm_type))
    gen = make_gen(3)
    scaler = torch.amp.GradScaler(device) if amp else None
    if amp:
        scaler.scale(torch.ones((), device=device))  # initialises the scale lazily, like scale(loss)
    per_step = []
    for t in range(steps):
        for p in fo.params:
            p.grad = (torch.randn(p.shape, generator=gen) * 2).to(device=device, dtype=dtype)
            if amp:
                p.grad.mul_(scaler.get_scale())
        if t == 1:
            fo.params[0].grad.view(-1)[0] = float("inf") if amp else float("nan")
        rec = RecordFusedOps()
        with rec:
            if amp:
                scaler.step(fo.opt)
            else:
                fo.opt.step()
        if amp:
            scaler.update()
        per_step.append(rec.calls)
    return per_step


@pytest.mark.parametrize("scenario", list(OP_SCENARIOS))
def test_two_fused_op_calls_per_device_per_step(scenario, device):
    for t, calls in enumerate(record(scenario, device)):
        names = [c[0]._schema.name for c in calls]
        assert names == ["fusedopt::grad_norm_", "fusedopt::step_"], (
            f"step {t}: fused op calls {names}, expected grad_norm_ then step_ (one each per device)")
        devs = Counter(op_device(a, k) for _, a, k in calls)
        assert all(n == 2 for n in devs.values()), devs


@pytest.mark.parametrize("scenario", OPCHECK_SCENARIOS)
def test_opcheck(scenario, device):
    """torch.library.opcheck (schema / mutation annotations, fake kernel, autograd registration,
    AOT dispatch) on the recorded grad_norm_ calls of a finite and a non-finite step (with and
    without grad_scale, l2 and inf, float32 and bf16), and on the first step_ call carrying the
    clip argument (step_ without it: test_optim_opcheck.py)."""
    per_step = record(scenario, device, steps=2)
    checked = Counter()
    for t, calls in enumerate(per_step):
        for func, args, kwargs in calls:
            if func._schema.name == "fusedopt::step_" and t > 0:
                continue
            torch.library.opcheck(func, args, kwargs)
            checked[func._schema.name] += 1
    assert checked["fusedopt::grad_norm_"] == 2 and checked["fusedopt::step_"] == 1, checked


def test_grad_norm_schema():
    import fusedopt  # noqa: F401 - loads the extension

    assert hasattr(torch.ops.fusedopt, "grad_norm_"), "torch.ops.fusedopt.grad_norm_ is not registered"
    schema = torch.ops.fusedopt.grad_norm_.default._schema
    assert len(schema.returns) == 0, f"grad_norm_ should return nothing (writes its out argument): {schema}"
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    grads = schema.arguments[0]
    assert grads.alias_info is None or not grads.alias_info.is_write, f"grad_norm_ must not write the grads: {schema}"
    assert written, f"grad_norm_ writes its result but declares no mutated argument: {schema}"


# --------------------------------------------------------------------------------------------
# CUDA only: no host sync
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_clip_never_syncs_with_the_host(name):
    """grad_norm stays on the GPU: steps after the first (which may create state) run with
    torch.cuda.set_sync_debug_mode('error')."""
    ps = [torch.randn(s, device="cuda", requires_grad=True) for s in ((37,), (4099,), (3, 5))]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    opt = fused_cls(name)(ps, lr=1e-3, max_grad_norm=1.0, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p in ps:
                p.grad.mul_(1.5)
            opt.step()
            assert opt.grad_norm.device.type == "cuda"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ps_ = [p.grad for p in ps]
    torch.testing.assert_close(opt.grad_norm, torch_total_norm(ps_, 2.0).cuda(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_float64_params_are_clipped_in_float64(name, device):
    """torch clips float64 grads by a float64 norm and coefficient. With float64 params the
    step's norm and coefficient are float64 too (``grad_norm`` is float64), so the params match
    torch to float64 precision: a float32 coefficient was off by ~1e-8 of each clipped update.
    Lion (no torch class) against torch's clip followed by fusedopt's unclipped Lion step."""
    gen = torch.Generator().manual_seed(21)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((40,), (7, 9))]
    cls = getattr(fusedopt, name)
    ref_cls = getattr(torch.optim, name, None)
    kw = dict(lr=0.1) if name != "Lion" else dict(lr=1e-3, weight_decay=0.1)
    ps = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(ps, max_grad_norm=4.0, **kw)
    ref = ref_cls(qs, foreach=False, **kw) if ref_cls is not None else cls(qs, **kw)
    clipped = 0
    for step in range(6):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) * 2.0 ** (step % 3 - 2) for t in init]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.to(device), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(qs, 4.0, foreach=False)
        clipped += bool(norm > 4.0)
        opt.step()
        ref.step()
        assert opt.grad_norm.dtype == torch.float64
        torch.testing.assert_close(opt.grad_norm.cpu(), norm, rtol=1e-14, atol=0)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-13, atol=1e-15)
    assert 0 < clipped < 6


def test_float32_squares_past_the_float_range_get_their_true_norm(device):
    """A float32 grad whose squares sum past FLT_MAX within one 128-element block (elements
    above ~1.6e18) still has its true, finite norm, in the step and in clip_grad_norm_, for any
    length; torch reports inf."""
    for n in (127, 128, 300):
        g = torch.full((n,), 1e19)
        exact = float(torch.linalg.vector_norm(g.double()))
        p = torch.nn.Parameter(torch.zeros(n, device=device))
        p.grad = g.clone().to(device)
        assert float(fusedopt.clip_grad_norm_([p], 1.0)) == pytest.approx(exact, rel=1e-6)
        p.grad = g.clone().to(device)
        opt = fusedopt.SGD([p], lr=1.0, max_grad_norm=1.0)
        opt.step()
        assert float(opt.grad_norm) == pytest.approx(exact, rel=1e-6)
        # clipped to norm 1: every element moved by -1/sqrt(n)
        torch.testing.assert_close(p.detach().cpu(), torch.full((n,), -1.0 / math.sqrt(n)), rtol=1e-5, atol=0)
