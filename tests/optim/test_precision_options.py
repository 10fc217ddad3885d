"""(7) Precision options of fusedopt.SGD / Adam / AdamW (keyword-only; the defaults are torch's
behaviour exactly):

  master_weights=True       float16/bfloat16 params get a float32 master copy in
                            state["master_param"]; the step updates the master and writes the
                            rounded param (float16: round-to-nearest-even, master.to(float16);
                            bfloat16: round to nearest, ties AWAY from zero, see below).
                            float32/float64 params are not affected (no master_param key).
  master_remainders=True    (bfloat16, with master_weights) the master is kept as the param plus
                            state["master_remainder"], int16 = the master's 16 low bits: results
                            bit-identical to master_weights=True.
  state_dtype=<dtype>       storage dtype of exp_avg / exp_avg_sq / max_exp_avg_sq /
                            momentum_buffer (math in float32); `step` unchanged.
  stochastic_rounding=True  (bfloat16 without master weights) the updated param is rounded
                            stochastically, reproducibly from torch's default RNG.

Why ties away for bfloat16: with remainders the master is (param, 16 low bits), and param must be
a function of the master that the remainder can invert; round-half-even cannot be inverted from 16
bits (the half-even bfloat16 value has 65,537 float32 preimages), so both master modes round ties
away from zero.  ``param == master.to(bfloat16)`` therefore holds except where the master's low
16 bits are exactly 0x8000 (precision_utils.bf16_round_ties_away is the exact rule).

Oracles: torch.optim.<Name>(foreach=False) in float32 on the upcast values, fed exactly the
gradients fusedopt gets (upcast); fusedopt against itself (remainders vs master_weights, resumed
vs uninterrupted, explicit defaults vs none) bit for bit.  Every test that steps runs on "cpu",
"emul" (the CUDA kernels emulated on the CPU; fewer steps there, see EMUL_STEPS) and "cuda".
Tolerances are argued where they are used.
"""

import copy
import math

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    Side,
    assert_close_dtype,
    assert_grads_untouched,
    assert_half_step_close,
    draw,
    feed_same_grads,
    fused_cls,
    half_snapshot,
    leaf,
    make_gen,
    ref_kwargs,
    resync_oracle,
    roundtrip,
    run_half_parity,
    state_of,
    step_value,
    torch_cls,
    ulp,
)
from precision_utils import (
    bf16_away_from_zero,
    bf16_round_ties_away,
    bf16_toward_zero,
    first_mismatch,
    float_bits_equal,
    master_from_remainder,
    remainder_of,
    tie_mask,
)

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
STEPS = 200
EMUL_STEPS = 60  # the emulated kernels are ~10x slower per step; still > 50 steps
SHAPES = [(37,), (33, 31), (4099,)]  # 5,159 elements, odd sizes, one 2-d
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
MASTER_KEYS = ("master_param", "master_remainder")

OPT_CASES = [
    ("SGD", dict(lr=0.01, momentum=0.9)),
    ("Adam", dict(lr=1e-3)),
    ("AdamW", dict(lr=1e-3, weight_decay=0.1)),
]
MASTER_CASES = [
    ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=1e-3, weight_decay=0.1)),
    ("Adam", dict(lr=1e-3, amsgrad=True, decoupled_weight_decay=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-3)),
    ("AdamW", dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
]


def case_id(name, hp):
    return f"{name}-" + "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in hp.items())


def ids_of(cases):
    return [case_id(n, hp) for n, hp in cases]


@pytest.fixture
def n_steps(request):
    """STEPS, or EMUL_STEPS for the "emul" variant (the device value is "cpu" for both)."""
    return EMUL_STEPS if request.node.get_closest_marker("emulated_cuda") is not None else STEPS


# --------------------------------------------------------------------------------------------
# building optimizers
# --------------------------------------------------------------------------------------------
def make_fused(name, hp, opts, *, dtype, device, seed, shapes=SHAPES):
    """A fusedopt optimizer with the given options over fresh params drawn from ``seed``."""
    vals = draw(shapes, make_gen(seed))
    params = [leaf(v, dtype, device) for v in vals]
    return Side(fused_cls(name)(params, **hp, **opts), params)


def build_oracle_pair(name, hp, opts, *, dtype, device, seed, shapes=SHAPES):
    """(float32 torch oracle, fusedopt with ``opts`` on ``dtype`` params), same initial values
    (the oracle starts from fusedopt's params upcast, exactly)."""
    fo = make_fused(name, hp, opts, dtype=dtype, device=device, seed=seed, shapes=shapes)
    ref_params = [leaf(p.detach(), FP32, device) for p in fo.params]
    return Side(torch_cls(name)(ref_params, **ref_kwargs(hp)), ref_params), fo


def fresh_like(side, name, hp, opts):
    """A new fusedopt optimizer (same options) over clones of ``side``'s current params."""
    params = [leaf(p.detach(), p.dtype, p.device) for p in side.params]
    return Side(fused_cls(name)(params, **hp, **opts), params)


def set_grads(sides, grads):
    for s in sides:
        for p, g in zip(s.params, grads, strict=True):
            p.grad = g.to(device=p.device, dtype=p.dtype).clone()


def draw_grads(side, gen):
    return [torch.randn(p.shape, generator=gen, dtype=FP64) for p in side.params]


def snapshot(side):
    """[(param, {key: value})] cloned, for bitwise comparisons."""
    out = []
    for p in side.params:
        st = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state_of(side.opt, p).items()}
        out.append((p.detach().clone(), st))
    return out


def assert_sides_bitwise_equal(a, b, what):
    """Same params and the same state (keys, dtypes, values) bit for bit."""
    for i, (pa, pb) in enumerate(zip(a.params, b.params, strict=True)):
        assert pa.dtype == pb.dtype
        assert torch.equal(pa, pb), f"{what}: param {i}: {first_mismatch(pa, pb)}"
        sa, sb = state_of(a.opt, pa), state_of(b.opt, pb)
        assert set(sa) == set(sb), f"{what}: param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            if k == "step":
                assert step_value(va) == step_value(vb), f"{what}: param {i}: step {float(va)} != {float(vb)}"
            elif torch.is_tensor(va):
                assert va.dtype == vb.dtype, f"{what}: param {i}: state[{k!r}] dtype {va.dtype} != {vb.dtype}"
                assert torch.equal(va, vb), f"{what}: param {i}: state[{k!r}]: {first_mismatch(va, vb)}"
            else:
                assert va == vb, f"{what}: param {i}: state[{k!r}] {va!r} != {vb!r}"


def master_of(side, p):
    """The float32 master of a half param: state['master_param'] or param + remainder."""
    st = state_of(side.opt, p)
    if "master_remainder" in st:
        return master_from_remainder(p, st["master_remainder"])
    return st["master_param"]


# v's per-step rounding errors decay only by beta2 = 0.999 per step, so unlike the param's (which
# vanish when both sides compute the same update and round the same sum) or exp_avg's (decay 0.9)
# they accumulate over the whole run: torch rounds v twice per step (mul_, addcmul_), a fused
# kernel once (fma) or in another order: ~0.35 ulp std per step, ~5 ulp std after 200 steps,
# ~20 ulp = 2.4e-6 relative for the worst of ~5k elements (4 sigma).  Measured against a
# one-rounding-per-step model: worst 1.2e-6.  4e-6 is still 25x below a beta2 off by 1e-5.
SECOND_MOMENT_RTOL = 4e-6


def assert_close_rtol(actual, expected, rtol, scale, what):
    """|actual - expected| <= rtol * (|expected| + max(scale, max|expected|)), like
    optim_parity_utils.assert_close_dtype with another rtol."""
    exp, act = expected.detach().to(FP64), actual.detach().to(FP64)
    atol = rtol * max(exp.abs().max().item(), scale or 0.0)
    err, tol = (act - exp).abs(), atol + rtol * exp.abs()
    if bool((err > tol).any()):
        i = (err > tol).flatten().nonzero()[0].item()
        raise AssertionError(f"{what}: {int((err > tol).sum())} elements beyond rtol={rtol} (atol={atol:.3g}); "
                             f"first at {i}: {act.flatten()[i].item():.9g} vs {exp.flatten()[i].item():.9g}")


def assert_param_is_rounded_master(p, master, what):
    """param == the master rounded as specified; returns the number of bfloat16 ties seen."""
    assert master.dtype == FP32, f"{what}: master is {master.dtype}, expected float32"
    assert master.shape == p.shape and master.device == p.device, f"{what}: master {master.shape} on {master.device}"
    m = master.detach()
    if p.dtype == FP16:
        exp = m.to(FP16)
        assert torch.equal(p, exp), f"{what}: float16 param != master.to(float16): {first_mismatch(p, exp)}"
        return 0
    exp = bf16_round_ties_away(m)
    assert torch.equal(p, exp), f"{what}: bfloat16 param != master rounded to nearest, ties away: {first_mismatch(p, exp)}"
    ties = tie_mask(m)
    assert bool(((p == m.to(BF16)) | ties).all()), f"{what}: param != master.to(bfloat16) off ties"
    return int(ties.sum())


# --------------------------------------------------------------------------------------------
# master_weights: the master is a float32 run
# --------------------------------------------------------------------------------------------
# bf16 over every case; fp16 (same master path, another rounding) over one case per optimizer
MASTER_RUNS = [(n, hp, BF16) for n, hp in MASTER_CASES] + [(n, hp, FP16) for n, hp in MASTER_CASES[::2]]


MASTER_RUN_IDS = [case_id(n, hp) + ("-bf16" if d == BF16 else "-fp16") for n, hp, d in MASTER_RUNS]


@pytest.mark.parametrize("name,hp,dtype", MASTER_RUNS, ids=MASTER_RUN_IDS)
def test_master_weights_follow_a_float32_run(name, hp, dtype, device, n_steps):
    """state['master_param'] equals a float32 torch.optim run fed the same (upcast) half grads;
    the half param is always the master rounded (bf16: ties away; fp16: to(float16)).

    Tolerance: optim_parity_utils.float_tolerance(float32) = 1e-6, atol = 1e-6 * the largest
    magnitude the oracle tensor had.  Both sides evaluate the same formulas in float32 on
    identical inputs (the half grads are exact in float32, the master starts as the exact upcast
    param); grads do not depend on the params, so per-step rounding differences (<= ~1 ulp of the
    master per step) do not feed back and random-walk: after 200 steps ~sqrt(200) * 0.3 ulp
    ~ 4 ulp ~ 5e-7 relative for typical elements, below rtol * |x| + atol (measured against
    a float64-math and a reordered-float32-math model: worst element 0.3x the tolerance).  Any formula error
    (missing bias correction, a beta off by 1e-5, the master rounded to half anywhere, moments
    kept in half) is >= 1e-4 relative.  This relies on the kernel rounding the decoupled-decayed
    master to float32 before the update, as torch (param.mul_(1 - lr*wd)) and fusedopt's float32
    path do; a second rounding torch has and the kernel lacks would random-walk the master by a
    few ulp over 200 steps (measured: up to 2.8x this tolerance with an unrounded decay).
    exp_avg_sq / max_exp_avg_sq: SECOND_MOMENT_RTOL (see there).
    state_dtype=float32 is passed explicitly: what moments master_weights alone keeps is not what
    this test is about.
    """
    opts = dict(master_weights=True, state_dtype=FP32)
    ref, fo = build_oracle_pair(name, hp, opts, dtype=dtype, device=device, seed=21)
    gen = make_gen(22)
    tr = MagnitudeTracker()
    tr.update(ref)
    ties = 0
    for t in range(1, n_steps + 1):
        grads = feed_same_grads(ref, fo, gen, dtype=dtype)
        ref.step()
        fo.step()
        tr.update(ref)
        what = f"{name} {dtype} master_weights step {t}"
        assert_grads_untouched(fo, grads, what)
        for i, p in enumerate(fo.params):
            st = state_of(fo.opt, p)
            assert "master_remainder" not in st, f"{what}: master_remainder without master_remainders=True"
            assert "master_param" in st, f"{what}: param {i} ({dtype}) has no state['master_param']"
            ties += assert_param_is_rounded_master(p, st["master_param"], f"{what}: param {i}")
        if t == 1 or t % 20 == 0 or t == n_steps:
            for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
                sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
                assert set(sf) == set(sr) | {"master_param"}, f"{what}: param {i}: keys {sorted(sf)} vs torch {sorted(sr)}"
                assert_close_dtype(sf["master_param"], pr, FP32, f"{what}: param {i} master vs float32 torch", tr.get(i, "param"))
                for k, vr in sr.items():
                    if k == "step":
                        assert step_value(sf[k]) == step_value(vr)
                        continue
                    assert sf[k].dtype == FP32, f"{what}: state[{k!r}] stored as {sf[k].dtype} with state_dtype=float32"
                    if k in ("exp_avg_sq", "max_exp_avg_sq"):
                        assert_close_rtol(sf[k], vr, SECOND_MOMENT_RTOL, tr.get(i, k), f"{what}: param {i} state[{k!r}]")
                    else:
                        assert_close_dtype(sf[k], vr, FP32, f"{what}: param {i} state[{k!r}]", tr.get(i, k))
    # ~5k elements * 200 steps with a 2**-16 chance each: bf16 ties do occur (and were checked)
    if dtype == BF16 and n_steps == STEPS:
        assert ties > 0, "no bfloat16 tie occurred: the ties-away check was never exercised"


@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_master_weights_leave_full_precision_params_alone(name, hp, device):
    """One optimizer holding float32, float64 and bfloat16 params with master_weights=True: the
    float32/float64 params get no master and step bit-identically to a default optimizer; the
    bfloat16 one gets its float32 master."""
    dtypes = [FP32, FP64, BF16]
    shapes = [(37,), (1000,), (257,)]

    def build(opts):
        vals = draw(shapes, make_gen(51))
        params = [leaf(v, dt, device) for v, dt in zip(vals, dtypes)]
        return Side(fused_cls(name)(params, **hp, **opts), params)

    mw, plain = build(dict(master_weights=True)), build({})
    gen = make_gen(52)
    for t in range(30):
        g = draw_grads(mw, gen)
        set_grads([mw, plain], g)
        mw.step()
        plain.step()
    for i in (0, 1):
        p, q = mw.params[i], plain.params[i]
        st, sq = state_of(mw.opt, p), state_of(plain.opt, q)
        assert not set(MASTER_KEYS) & set(st), f"{dtypes[i]} param got {sorted(set(MASTER_KEYS) & set(st))}"
        assert torch.equal(p, q), f"master_weights changed the {dtypes[i]} param: {first_mismatch(p, q)}"
        assert set(st) == set(sq)
        for k in st:
            if k != "step":
                assert st[k].dtype == q.dtype and torch.equal(st[k], sq[k]), f"{dtypes[i]} state[{k!r}]"
    st = state_of(mw.opt, mw.params[2])
    assert "master_param" in st and st["master_param"].dtype == FP32
    assert_param_is_rounded_master(mw.params[2], st["master_param"], "bf16 param in a mixed optimizer")


# --------------------------------------------------------------------------------------------
# master_remainders: bit-identical to master_weights
# --------------------------------------------------------------------------------------------
MW = dict(master_weights=True)
MR = dict(master_weights=True, master_remainders=True)
REMAINDER_CASES = OPT_CASES + [("Adam", dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
                               ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01))]


def assert_remainders_match(mw, mr, what):
    """The remainders side equals the master_weights side bit for bit: params, the master
    reconstructed from (param, remainder) vs master_param, and every other state entry."""
    for i, (pw, pr) in enumerate(zip(mw.params, mr.params, strict=True)):
        sw, sr = state_of(mw.opt, pw), state_of(mr.opt, pr)
        assert "master_param" not in sr, f"{what}: param {i}: master_remainders keeps a full master_param"
        rem = sr.get("master_remainder")
        assert rem is not None, f"{what}: param {i}: no state['master_remainder']"
        assert rem.dtype == torch.int16 and rem.shape == pr.shape and rem.device == pr.device, (
            f"{what}: master_remainder is {rem.dtype} {tuple(rem.shape)} on {rem.device}")
        assert torch.equal(pw, pr), f"{what}: param {i}: {first_mismatch(pw, pr)}"
        rec = master_from_remainder(pr, rem)
        assert float_bits_equal(rec, sw["master_param"]), (
            f"{what}: param {i}: master from (param, remainder) != master_param: {first_mismatch(rec, sw['master_param'])}")
        assert set(sw) - {"master_param"} == set(sr) - {"master_remainder"}, f"{what}: keys {sorted(sw)} vs {sorted(sr)}"
        for k in set(sw) - {"master_param"}:
            if k == "step":
                assert step_value(sw[k]) == step_value(sr[k])
            else:
                assert sw[k].dtype == sr[k].dtype and torch.equal(sw[k], sr[k]), f"{what}: param {i} state[{k!r}]"


@pytest.mark.parametrize("name,hp", REMAINDER_CASES, ids=ids_of(REMAINDER_CASES))
def test_master_remainders_bit_identical_to_master_weights(name, hp, device, n_steps):
    """n_steps steps side by side, checked every 5 steps (a difference in the master or the moments
    never heals, so it is still there at the next check); half way, both optimizers are
    replaced by fresh ones loaded from their own torch.save/torch.load checkpoint (the
    remainders must survive it: int16, not cast to the param dtype), and the uninterrupted
    master_weights run must still be matched bit for bit by the resumed ones."""
    mw = make_fused(name, hp, MW, dtype=BF16, device=device, seed=61)
    mr = make_fused(name, hp, MR, dtype=BF16, device=device, seed=61)
    mw_ref = make_fused(name, hp, MW, dtype=BF16, device=device, seed=61)  # never interrupted
    gen = make_gen(62)
    for t in range(1, n_steps + 1):
        g = draw_grads(mw, gen)
        set_grads([mw, mr, mw_ref], g)
        mw.step()
        mr.step()
        mw_ref.step()
        if t % 5 == 0 or t == 1:
            assert_remainders_match(mw, mr, f"{name} step {t}")
        if t == n_steps // 2:
            sd_w, sd_r = roundtrip(mw.opt.state_dict()), roundtrip(mr.opt.state_dict())
            for st in sd_r["state"].values():
                assert st["master_remainder"].dtype == torch.int16, "checkpoint: master_remainder not int16"
                assert "master_param" not in st
            mw, mr = fresh_like(mw, name, hp, MW), fresh_like(mr, name, hp, MR)
            mw.opt.load_state_dict(sd_w)
            mr.opt.load_state_dict(sd_r)
            assert_remainders_match(mw, mr, f"{name} right after loading the checkpoints")
            assert_sides_bitwise_equal(mw, mw_ref, f"{name} master_weights right after loading its checkpoint")
    assert_sides_bitwise_equal(mw, mw_ref, f"{name} master_weights resumed vs uninterrupted")
    # the point of the mode: 2 bytes per element instead of 4
    for p in mr.params:
        assert state_of(mr.opt, p)["master_remainder"].element_size() == 2


INF_STEPS = (0, 1, 5, 17)


def assert_skipped_step_changed_nothing(side, snap, what):
    """A GradScaler-skipped step leaves params and existing state bitwise unchanged.  If a param
    had no state before (a skipped FIRST step), any state it has now must be the pristine
    initial one: step 0, zero moments (no SGD momentum buffer at all: torch would initialise it
    from the grad at the first real step), master == param, remainder == 0."""
    for i, (p, (p0, st0)) in enumerate(zip(side.params, snap)):
        assert torch.equal(p, p0), f"{what}: skipped step changed param {i}"
        st = state_of(side.opt, p)
        if not st0:
            assert "momentum_buffer" not in st, f"{what}: skipped first step left a momentum_buffer"
            for k, v in st.items():
                if k == "step":
                    assert step_value(v) == 0, f"{what}: skipped first step counted a step"
                elif k == "master_param":
                    assert torch.equal(v, p.detach().float()), f"{what}: master != param after a skipped first step"
                else:
                    assert torch.count_nonzero(v) == 0, f"{what}: skipped first step wrote state[{k!r}]"
            continue
        assert set(st) == set(st0), f"{what}: skipped step changed the state keys of param {i}"
        for k, v0 in st0.items():
            if torch.is_tensor(v0):
                assert torch.equal(st[k], v0), f"{what}: skipped step changed state[{k!r}] of param {i}"


@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_master_remainders_match_master_weights_under_grad_scaler(name, hp, device):
    """Real torch.amp.GradScaler (which hands fusedopt grad_scale / found_inf through the
    optimizer's attributes); an inf is injected into one grad on INF_STEPS.  The loss depends on
    the (identical) bf16 params, so both sides see identical scaled grads; skipped steps change
    nothing; both modes stay bit-identical; the scales follow the same schedule."""
    mw = make_fused(name, hp, MW, dtype=BF16, device=device, seed=71)
    mr = make_fused(name, hp, MR, dtype=BF16, device=device, seed=71)
    assert mw.opt._step_supports_amp_scaling is True and mr.opt._step_supports_amp_scaling is True
    scalers = [torch.amp.GradScaler(device), torch.amp.GradScaler(device)]
    gen = make_gen(72)
    n = 40
    for t in range(n):
        c = [torch.randn(p.shape, generator=gen).to(device) for p in mw.params]
        for side, scaler in zip((mw, mr), scalers):
            side.opt.zero_grad()
            loss = sum((p.float() * ci).sum() + 0.05 * (p.float() ** 2).sum() for p, ci in zip(side.params, c))
            scaler.scale(loss).backward()
            if t in INF_STEPS:
                with torch.no_grad():
                    side.params[t % len(side.params)].grad.view(-1)[t] = float("inf")
            snap = snapshot(side)
            scaler.step(side.opt)
            scaler.update()
            if t in INF_STEPS:
                assert_skipped_step_changed_nothing(side, snap, f"{name} GradScaler step {t}")
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"scale diverged at step {t}"
        if t not in (0, 1):  # after two skipped first steps there may be no state yet
            assert_remainders_match(mw, mr, f"{name} GradScaler step {t}")
    assert scalers[0].get_scale() < 2.0**16
    for p in mr.params:
        st = state_of(mr.opt, p)
        if "step" in st:
            assert step_value(st["step"]) == n - len(INF_STEPS)


@pytest.mark.parametrize("mode", ["master_weights", "master_remainders"])
def test_bf16_ties_round_away_from_zero(mode, device):
    """Masters exactly half way between two bfloat16 values (low 16 bits 0x8000, both signs):
    after a step that leaves the master unchanged (lr=0), the param is the neighbour AWAY from
    zero (round-half-even would pick the even one, i.e. toward zero for about half of them)."""
    opts = MW if mode == "master_weights" else MR
    side = make_fused("SGD", dict(lr=0.1, momentum=0.9), opts, dtype=BF16, device=device, seed=81, shapes=[(4099,)])
    gen = make_gen(82)
    set_grads([side], draw_grads(side, gen))
    side.step()  # creates the state
    p = side.params[0]
    st = state_of(side.opt, p)
    base = torch.randn(p.shape, generator=gen).to(BF16).float()  # bf16 values, both signs
    tie = (base.view(torch.int32) | 0x8000).view(torch.float32).to(device)  # |base| + half an ulp
    assert bool(tie_mask(tie).all())
    with torch.no_grad():
        if mode == "master_weights":
            st["master_param"].copy_(tie)
        else:  # the (param, remainder) encoding of the master `tie`
            p.copy_(bf16_round_ties_away(tie))
            st["master_remainder"].copy_(remainder_of(tie))
            assert float_bits_equal(master_from_remainder(p, st["master_remainder"]), tie)
    side.opt.param_groups[0]["lr"] = 0.0  # master - 0 * buf == master exactly
    set_grads([side], draw_grads(side, gen))
    side.step()
    assert float_bits_equal(master_of(side, p), tie), "lr=0 step changed the master"
    away = bf16_away_from_zero(tie)
    assert torch.equal(p, away), f"ties must round away from zero: {first_mismatch(p, away)}"
    # sanity of the data: half-even differs on a good share of these ties
    assert int((away != tie.to(BF16)).sum()) > p.numel() // 4


# --------------------------------------------------------------------------------------------
# state_dtype
# --------------------------------------------------------------------------------------------
STATE_CASES = [
    ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-3, weight_decay=0.1)),
]
STATE_DTYPE_CASES = [(FP32, BF16), (FP32, FP16), (BF16, FP32)]


def decay_term(name, group, before):
    """|lr * wd * p| for decoupled weight decay (not driven by the moments), else 0."""
    decoupled = name == "AdamW" or group.get("decoupled_weight_decay", False)
    if name == "SGD" or not decoupled or not group["weight_decay"]:
        return torch.zeros_like(before)
    return float(group["lr"]) * group["weight_decay"] * before.abs()


def assert_f32_step_close(actual, expected, before, what, extra=None):
    """One step of float32-stored values from identical inputs: both sides evaluate the same
    formula in float32 and differ by evaluation order: 2 ulp of the result plus 64 eps_f32 of
    the change (cancellation, see optim_parity_utils.assert_half_step_close); plus ``extra``."""
    assert actual.dtype == FP32, f"{what}: dtype {actual.dtype}, expected float32"
    exp, act, old = (x.detach().to(FP64) for x in (expected, actual, before))
    tol = 2 * ulp(exp, FP32) + 64 * torch.finfo(FP32).eps * (exp - old).abs()
    if extra is not None:
        tol = tol + extra
    err = (act - exp).abs()
    if bool((err > tol).any()):
        i = (err > tol).flatten().nonzero()[0].item()
        raise AssertionError(f"{what}: {int((err > tol).sum())} elements out of tolerance; first at {i}: "
                             f"fusedopt={act.flatten()[i].item():.9g} oracle={exp.flatten()[i].item():.9g} "
                             f"before={old.flatten()[i].item():.9g} tol={tol.flatten()[i].item():.3g}")


@pytest.mark.parametrize("param_dtype,state_dtype", STATE_DTYPE_CASES,
                         ids=[f"p{str(a)[6:]}-s{str(b)[6:]}" for a, b in STATE_DTYPE_CASES])
@pytest.mark.parametrize("name,hp", STATE_CASES, ids=ids_of(STATE_CASES))
def test_state_dtype_per_step(name, hp, param_dtype, state_dtype, device):
    """Moments are stored in state_dtype (step unchanged), and each step is the float32 step
    from the same inputs: the float32 oracle is re-synced to fusedopt's params and state
    (upcast, exact) before every step, so only the step's own rounding is compared.

    * moments stored in half: assert_half_step_close (one rounding to the storage type,
      <= 2 ulp of it + 64 eps_f32 of the change); stored in float32: assert_f32_step_close.
    * float32 params with half moments: the update may legitimately be computed from the moments
      before or after their rounding to the storage type; after costs a relative error of at
      most 0.75 * eps_state of the moment-driven part (m: half an ulp = eps/2, v: eps/4 through
      the sqrt), so the allowance is eps_state * |moment-driven part|, which is |change| plus
      any decoupled decay term.  Keeping the moments in float32 would pass this too; the dtype
      check catches that, and the bound is ~100x below any formula error.
    * half params with float32 moments: assert_half_step_close on the param.
    Grads: kind="half" (|g| in [0.5, 2]) keeps exp_avg_sq in the float16 normal range.
    """
    ref, fo = build_oracle_pair(name, hp, dict(state_dtype=state_dtype), dtype=param_dtype, device=device, seed=91)
    gen = make_gen(92)
    eps_state = torch.finfo(state_dtype).eps
    for t in range(1, 61):
        resync_oracle(ref, fo)
        before = half_snapshot(fo)
        grads = feed_same_grads(ref, fo, gen, dtype=param_dtype, kind="half")
        ref.step()
        fo.step()
        what = f"{name} params {param_dtype} state_dtype={state_dtype} step {t}"
        assert_grads_untouched(fo, grads, what)
        for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
            sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
            assert set(sf) == set(sr), f"{what}: param {i}: keys {sorted(sf)} != torch {sorted(sr)}"
            b = {k: (v.to(FP32) if torch.is_tensor(v) else v) for k, v in before[i].items()}
            for k, vr in sr.items():
                if k == "step":
                    assert torch.is_tensor(sf[k]) and sf[k].dtype == FP32, f"{what}: step is {sf[k]!r}"
                    assert step_value(sf[k]) == step_value(vr) == t
                    continue
                assert sf[k].dtype == state_dtype, f"{what}: state[{k!r}] stored as {sf[k].dtype}, state_dtype={state_dtype}"
                assert sf[k].shape == pf.shape and sf[k].device == pf.device
                old = b.get(k, torch.zeros_like(vr))
                if state_dtype == FP32:
                    assert_f32_step_close(sf[k], vr, old, f"{what}: param {i} state[{k!r}]")
                else:
                    assert_half_step_close(sf[k], vr, old, state_dtype, f"{what}: param {i} state[{k!r}]")
            assert pf.dtype == param_dtype
            if param_dtype == FP32:
                bp = b["param"].to(FP64)
                change = (pr.detach().to(FP64) - bp).abs()
                group = fo.opt.param_groups[0]
                extra = eps_state * (change + decay_term(name, group, bp)) if state_dtype != FP32 else None
                assert_f32_step_close(pf, pr, b["param"], f"{what}: param {i}", extra)
            else:
                assert_half_step_close(pf, pr, b["param"], param_dtype, f"{what}: param {i}")


LONG_RUN_REL = 0.05


@pytest.mark.parametrize("name,hp", STATE_CASES, ids=ids_of(STATE_CASES))
def test_state_dtype_bf16_long_run_stays_near_float32(name, hp, device, n_steps):
    """float32 params, bfloat16 moments, n_steps steps without re-syncing: the params stay within
    LONG_RUN_REL of the distance each element travelled (sum over steps of |torch's update|).

    Argument.  Every step stores each moment rounded to bfloat16: a relative error <= 2**-8
    (half an ulp; ulp <= 2**-7 |x|).
    * SGD(momentum=0.9): the buffer's rounding errors decay by 0.9 per step, so the buffer error
      at step t is <= 2**-8 * sum_k 0.9**k |buf_{t-k}|; summed over the run, the param error is
      <= 2**-8 / (1 - 0.9) * sum_t lr |buf_t| = 0.039 * path (first order, worst case: all
      errors of one sign).
    * Adam: m contributes the same 0.039 * path (beta1 = 0.9); v's rounding errors decay only by
      beta2 = 0.999 per step, i.e. accumulate over the whole run, but they are unbiased and
      independent: relative std of v after t steps ~ sqrt(t) * 2**-8/sqrt(3) = 3.2% at t = 200,
      halved by the sqrt: 1.6% (worst element of 5k: ~4 sigma, 6%), and it enters the update
      with one sign for long stretches (v changes slowly), so it adds to the path-relative error.
    LONG_RUN_REL = 0.05 covers SGD's worst case and Adam's estimate (measured against an exact
    "float64 math, moments rounded to bf16 every step" model: worst element 0.010 of its path for
    Adam/AdamW, 0.004 for SGD) and fails for moments that are dropped, reset or mis-scaled
    (errors of the size of the path itself).
    atol: 4 ulp_f32 of the largest |param| seen, for elements that hardly moved.
    """
    opts = dict(state_dtype=BF16)
    ref, fo = build_oracle_pair(name, hp, opts, dtype=FP32, device=device, seed=101)
    gen = make_gen(102)
    path = [torch.zeros_like(p, dtype=FP64) for p in ref.params]
    scale = [p.detach().abs().max().item() for p in ref.params]
    for _ in range(n_steps):
        before = [p.detach().to(FP64) for p in ref.params]
        feed_same_grads(ref, fo, gen, dtype=FP32)
        ref.step()
        fo.step()
        for i, p in enumerate(ref.params):
            path[i] += (p.detach().to(FP64) - before[i]).abs()
            scale[i] = max(scale[i], p.detach().abs().max().item())
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
        for k, v in state_of(fo.opt, pf).items():
            if k != "step":
                assert v.dtype == BF16, f"state[{k!r}] is {v.dtype}"
        err = (pf.detach().to(FP64) - pr.detach().to(FP64)).abs()
        tol = LONG_RUN_REL * path[i] + 4 * scale[i] * torch.finfo(FP32).eps
        worst = (err / tol).max().item()
        assert worst <= 1, (f"{name} param {i}: bf16-moment run drifted from float32 torch by up to "
                            f"{worst:.3g}x the allowed {LONG_RUN_REL} * path")


MLP_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.01)),
]


def mlp_data(device):
    """Regression on a fixed random teacher (8 -> 16 -> 1, tanh), 256 samples."""
    gen = make_gen(111)
    x = torch.randn(256, 8, generator=gen)
    w1, w2 = torch.randn(8, 16, generator=gen) / 8**0.5, torch.randn(16, 1, generator=gen) / 16**0.5
    y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(256, 1, generator=gen)
    init = [torch.randn(8, 32, generator=gen) * 0.3, torch.zeros(32), torch.randn(32, 1, generator=gen) * 0.3, torch.zeros(1)]
    return x.to(device), y.to(device), init


def mlp_loss(params, x, y):
    w1, b1, w2, b2 = params
    return ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()


MLP_STEPS = 150


@pytest.mark.parametrize("name,hp", MLP_CASES, ids=ids_of(MLP_CASES))
def test_state_dtype_bf16_trains_a_tiny_mlp_like_float32(name, hp, device):
    """A 2-layer MLP (float32 params), full batch, MLP_STEPS steps: fusedopt with bf16 moments
    reaches the loss of float32 torch.optim within 10% (relative), and both learned (loss
    down >= 5x).  Tolerance: bf16 moments change each update by <= ~1-3% (see the long-run
    test); a perturbation of the step sizes of that order changes the loss reached after a
    fixed number of steps by a similar relative amount on this smooth problem (measured against
    the exact bf16-moment model: < 2%, loss 2.2 -> 0.006-0.008); 10% leaves room for the nonlinear dynamics while a
    broken moment (dropped, reset, wrong dtype scaling) does not reach the float32 loss."""
    x, y, init = mlp_data(device)
    ref_p = [leaf(v, FP32, device) for v in init]
    fo_p = [leaf(v, FP32, device) for v in init]
    ref = torch_cls(name)(ref_p, **ref_kwargs(hp))
    fo = fused_cls(name)(fo_p, **hp, state_dtype=BF16)
    with torch.no_grad():
        loss0 = mlp_loss(ref_p, x, y).item()
    for params, opt in ((ref_p, ref), (fo_p, fo)):
        for _ in range(MLP_STEPS):
            opt.zero_grad()
            mlp_loss(params, x, y).backward()
            opt.step()
    with torch.no_grad():
        l_ref, l_fo = mlp_loss(ref_p, x, y).item(), mlp_loss(fo_p, x, y).item()
    assert all(v.dtype == BF16 for p in fo_p for k, v in fo.state[p].items() if k != "step")
    assert l_ref < loss0 / 5, f"the float32 reference did not learn ({loss0:.4g} -> {l_ref:.4g}); test setup broken"
    assert abs(l_fo - l_ref) <= 0.10 * l_ref, f"bf16 moments: loss {l_fo:.5g} vs float32 torch {l_ref:.5g} (from {loss0:.4g})"


# --------------------------------------------------------------------------------------------
# stochastic_rounding
# --------------------------------------------------------------------------------------------
SR = dict(stochastic_rounding=True)
BF16_ULP_12 = 2.0**-7  # bfloat16 spacing in [1, 2)


def bf16_unit_params(n, gen, lo, hi, signed):
    """bfloat16 values with magnitude in [lo, hi) (inside [1, 2): spacing 2**-7), float64."""
    mag = (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=FP64)).to(BF16).to(FP64)
    if not signed:
        return mag
    return mag * (torch.randint(0, 2, (n,), generator=gen).to(FP64) * 2 - 1)


SR_UNBIASED_CASES = [
    ("SGD", dict(lr=2.0**-10)),  # |update| = lr |g| in [0.06, 0.19] ulp
    ("Adam", dict(lr=3e-4)),  # first step: |update| ~ lr = 0.04 ulp
    ("AdamW", dict(lr=1e-3, weight_decay=0.1)),  # ~0.13 ulp, plus decay
]


@pytest.mark.parametrize("name,hp", SR_UNBIASED_CASES, ids=ids_of(SR_UNBIASED_CASES))
def test_stochastic_rounding_is_unbiased(name, hp, device):
    """TRIALS independent single steps of N bf16 params by amounts far below half an ulp.

    Each result must be one of the two bfloat16 neighbours of the float32 value x (float32 torch
    on the upcast param; x is far from bfloat16 values, so float32 order-of-evaluation
    differences cannot change the neighbours), rounded away from the toward-zero neighbour with
    probability q = (|x| - |lo|) / ulp.  Unbiased: E[r - x] = 0.  The sum over all
    TRIALS * N samples of (r - x) / ulp has variance sum q(1-q) (independent Bernoullis), so its
    z-score must be within +-5 (false alarm ~6e-7).  Round-to-nearest on the same data gives
    |z| ~ 40-80 (checked > 20, so the test can tell); a rounding biased by more than ~6-12% of the
    update (depending on the case) fails too.
    """
    n, trials = 1000, 48
    gen = make_gen(121)
    p0 = bf16_unit_params(n, gen, 1.0625, 1.9375, signed=True)  # x stays inside its binade
    g = (p0.sign() * (0.5 + torch.rand(n, generator=gen, dtype=FP64))).to(BF16)  # step toward zero
    ref_p = leaf(p0, FP32, device)
    ref = torch_cls(name)([ref_p], **ref_kwargs(hp))
    ref_p.grad = g.to(device=device, dtype=FP32)
    ref.step()
    x = ref_p.detach()
    lo, hi = bf16_toward_zero(x), bf16_away_from_zero(x)
    assert not bool(tie_mask(x).any()) and bool((lo != hi).all())
    spacing = (hi.to(FP64) - lo.to(FP64)).abs()
    q = (x.to(FP64).abs() - lo.to(FP64).abs()) / spacing  # P(rounded away from zero)
    p0d = p0.to(device)
    assert bool(((x.to(FP64) - p0d).abs() < 0.5 * spacing).all()), "test setup: updates must stay below half an ulp"
    total = torch.zeros((), dtype=FP64, device=x.device)
    for trial in range(trials):
        p = leaf(p0, BF16, device)
        opt = fused_cls(name)([p], **hp, **SR)
        p.grad = g.to(device)
        opt.step()
        r = p.detach()
        ok = (r == lo) | (r == hi)
        assert bool(ok.all()), f"trial {trial}: stochastic rounding gave a value that is not a neighbour of the float32 result"
        total += ((r.to(FP64) - x.to(FP64)) * x.sign().to(FP64) / spacing).sum()
    sigma = math.sqrt(trials * float((q * (1 - q)).sum()))
    z = total.item() / sigma
    assert abs(z) < 5, f"stochastic rounding is biased: z = {z:.2f} (mean error {total.item() / (n * trials):.4g} ulp)"
    z_rtn = ((x.to(BF16).to(FP64) - x.to(FP64)) * x.sign().to(FP64) / spacing).sum().item() * trials / sigma
    assert abs(z_rtn) > 20, f"test setup: round-to-nearest is not distinguishable (z={z_rtn:.1f})"


@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_stochastic_rounding_reproducible_from_torch_seed(name, hp, device):
    """torch.manual_seed(s) before a run makes it repeat bit for bit; another seed gives another
    run; and it is not round-to-nearest."""

    def run(seed, opts):
        torch.manual_seed(seed)
        side = make_fused(name, hp, opts, dtype=BF16, device=device, seed=131)
        gen = make_gen(132)
        for _ in range(60):
            set_grads([side], draw_grads(side, gen))
            side.step()
        return side

    a, b, c = run(0, SR), run(0, SR), run(1, SR)
    assert_sides_bitwise_equal(a, b, f"{name}: two stochastic-rounding runs after torch.manual_seed(0)")
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.params, c.params)), "seeds 0 and 1 gave identical runs"
    rtn = run(0, {})
    assert any(not torch.equal(pa, pr) for pa, pr in zip(a.params, rtn.params)), "stochastic_rounding=True changed nothing"


SR_LEARN_CASES = [
    ("SGD", dict(lr=0.25 * BF16_ULP_12), {}),  # lr*g in [0.1, 0.25] ulp
    ("SGD", dict(lr=0.025 * BF16_ULP_12, momentum=0.9), dict(state_dtype=FP32)),  # buf -> 10 g: <= 0.25 ulp
    ("Adam", dict(lr=0.25 * BF16_ULP_12), dict(state_dtype=FP32)),  # constant g: update ~ lr = 0.25 ulp
]


@pytest.mark.parametrize("name,hp,extra", SR_LEARN_CASES, ids=[case_id(n, hp) for n, hp, _ in SR_LEARN_CASES])
def test_stochastic_rounding_keeps_learning_where_round_to_nearest_stalls(name, hp, extra, device, n_steps):
    """bf16 params in [1.45, 1.95) (ulp 2**-7), constant grads in [0.4, 1], every update
    <= 0.25 ulp (at most 50 ulp = 0.39 in 200 steps: the params stay inside [1, 2)).
    Round to nearest (fusedopt's default) never moves a param; with stochastic rounding the
    mean over N elements of (param - float32 torch param) stays within 5 sigma of 0 at every
    check, sigma = ulp * sqrt(t / (4 N)): each step adds to each element an independent
    zero-mean rounding error of variance q(1-q) ulp**2 <= ulp**2 / 4 (the updates depend only on
    the grads and the float32 state, not on the params), so after t steps the mean over N
    elements has variance <= t ulp**2 / (4 N).  (t=200, N=4099: 5 sigma = 0.55 ulp, against a
    distance of 35-50 ulp travelled; emul, t=60: 0.30 ulp against 9-15 ulp.)"""
    n = 4099
    gen = make_gen(141)
    p0 = bf16_unit_params(n, gen, 1.45, 1.95, signed=False)
    g = (0.4 + 0.6 * torch.rand(n, generator=gen, dtype=FP64)).to(BF16)
    ref_p = leaf(p0, FP32, device)
    ref = torch_cls(name)([ref_p], **ref_kwargs(hp))
    sr_p, rtn_p = leaf(p0, BF16, device), leaf(p0, BF16, device)
    sr = fused_cls(name)([sr_p], **hp, **SR, **extra)
    rtn = fused_cls(name)([rtn_p], **hp)
    for t in range(1, n_steps + 1):
        for p in (ref_p, sr_p, rtn_p):
            p.grad = g.to(device=device, dtype=p.dtype)
        ref.step()
        sr.step()
        rtn.step()
        if t % 20 == 0 or t == n_steps:
            diff = (sr_p.detach().to(FP64) - ref_p.detach().to(FP64)).mean().item()
            sigma = BF16_ULP_12 * math.sqrt(t / (4 * n))
            assert abs(diff) < 5 * sigma, (f"step {t}: stochastic-rounding mean is {diff / BF16_ULP_12:.3f} ulp off "
                                           f"float32 (5 sigma = {5 * sigma / BF16_ULP_12:.3f})")
    moved = (p0.to(device) - ref_p.detach().to(FP64)).mean().item()
    assert moved > 5 * BF16_ULP_12, f"test setup: float32 moved only {moved / BF16_ULP_12:.1f} ulp"
    assert torch.equal(rtn_p.detach().to(FP64), p0.to(device)), "test setup: round-to-nearest should stall here"
    assert float(ref_p.detach().min()) > 1.0  # stayed in the binade the sigma assumes


# --------------------------------------------------------------------------------------------
# defaults, errors
# --------------------------------------------------------------------------------------------
DEFAULT_OPTS = dict(master_weights=False, master_remainders=False, state_dtype=None, stochastic_rounding=False)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_defaults_change_nothing(name, hp, dtype, device):
    """The options spelled out at their defaults step bit-identically to no options; the state
    has torch's keys (no master entries) with moments in the param dtype; and half params still
    match torch the way the parity suite requires (assert_half_step_close, a short run)."""
    a = make_fused(name, hp, {}, dtype=dtype, device=device, seed=151)
    b = make_fused(name, hp, DEFAULT_OPTS, dtype=dtype, device=device, seed=151)
    tparams = [leaf(p.detach(), dtype, device) for p in a.params]
    tref = Side(torch_cls(name)(tparams, **ref_kwargs(hp)), tparams)
    gen = make_gen(152)
    for t in range(10):
        set_grads([a, b, tref], draw_grads(a, gen))
        a.step()
        b.step()
        tref.step()
        assert_sides_bitwise_equal(a, b, f"{name} {dtype}: explicit default options vs none, step {t}")
    for p, q in zip(a.params, tref.params):
        st = state_of(a.opt, p)
        assert set(st) == set(state_of(tref.opt, q)), f"keys {sorted(st)} vs torch {sorted(state_of(tref.opt, q))}"
        for k in MOMENT_KEYS:
            if k in st:
                assert st[k].dtype == dtype, f"default state[{k!r}] is {st[k].dtype}, param {dtype}"
    if dtype != FP32:
        run_half_parity(name, [([(7,), (257,)], {})], dtype=dtype, device=device, steps=10, ctor=hp)


ERROR_CASES = [
    ("master_remainders_without_master_weights", BF16, dict(master_remainders=True), ValueError, "master_remainders"),
    ("stochastic_rounding_with_master_weights", BF16, dict(master_weights=True, stochastic_rounding=True), ValueError, "stochastic_rounding"),
    ("state_dtype_int32", FP32, dict(state_dtype=torch.int32), ValueError, "state_dtype"),
    ("state_dtype_int32_bf16_params", BF16, dict(state_dtype=torch.int32), ValueError, "state_dtype"),
    # not a dtype at all: a TypeError is as clear as a ValueError here
    ("state_dtype_string", FP32, dict(state_dtype="bf16"), (ValueError, TypeError), "state_dtype"),
    ("master_remainders_float16_params", FP16, dict(master_weights=True, master_remainders=True), ValueError, "master_remainders"),
]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_option_combinations_fail_at_construction(case, name):
    _, dtype, opts, exc, fragment = case
    params = [torch.zeros(5, dtype=dtype, requires_grad=True)]
    hp = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=1e-3)
    with pytest.raises(exc, match=fragment):
        fused_cls(name)(params, **hp, **opts)


VALID_OPTS = [
    (BF16, dict(master_weights=True)),
    (FP16, dict(master_weights=True)),
    (BF16, dict(master_weights=True, master_remainders=True)),
    (BF16, dict(stochastic_rounding=True)),
    (FP32, dict(state_dtype=BF16)),
    (FP32, dict(state_dtype=FP16)),
    (BF16, dict(state_dtype=FP32)),
    (BF16, dict(master_weights=True, master_remainders=True, state_dtype=BF16)),
]
VALID_IDS = ["bf16-mw", "fp16-mw", "bf16-mw-mr", "bf16-sr", "fp32-state_bf16", "fp32-state_fp16", "bf16-state_fp32",
             "bf16-mw-mr-state_bf16"]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype,opts", VALID_OPTS, ids=VALID_IDS)
def test_valid_option_combinations_are_accepted(dtype, opts, name):
    params = [torch.zeros(5, dtype=dtype, requires_grad=True)]
    hp = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=1e-3)
    opt = fused_cls(name)(params, **hp, **opts)  # no error
    assert isinstance(opt, torch_cls(name))


# --------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------
MODES = {
    "master_weights-bf16": (BF16, dict(master_weights=True)),
    "master_weights-fp16": (FP16, dict(master_weights=True)),
    "master_remainders": (BF16, dict(master_weights=True, master_remainders=True)),
    "state_dtype_bf16": (FP32, dict(state_dtype=BF16)),
    "stochastic_rounding": (BF16, dict(stochastic_rounding=True)),
}
K1, K2 = 7, 9


def expected_entry_dtypes(dtype, opts):
    out = {}
    if opts.get("master_weights") and dtype in (BF16, FP16):
        out["master_remainder" if opts.get("master_remainders") else "master_param"] = (
            torch.int16 if opts.get("master_remainders") else FP32)
    if opts.get("state_dtype") is not None:
        out.update({k: opts["state_dtype"] for k in MOMENT_KEYS})
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_checkpoint_round_trip_continues_bit_identically(name, hp, mode, device):
    """state_dict -> torch.save/torch.load(weights_only) -> a fresh optimizer with the same
    options continues exactly like the uninterrupted one (stochastic rounding: both continuations
    start from the same torch RNG state).  The checkpoint holds the new entries in their dtypes."""
    dtype, opts = MODES[mode]
    torch.manual_seed(5)
    side = make_fused(name, hp, opts, dtype=dtype, device=device, seed=161)
    gen = make_gen(162)
    for _ in range(K1):
        set_grads([side], draw_grads(side, gen))
        side.step()
    sd = roundtrip(side.opt.state_dict())
    want = expected_entry_dtypes(dtype, opts)
    for pid, st in sd["state"].items():
        for k, dt in want.items():
            if k in MASTER_KEYS:
                assert k in st, f"checkpoint of param {pid} lacks {k!r}"
            if k in st:
                assert st[k].dtype == dt, f"checkpoint: state[{k!r}] is {st[k].dtype}, expected {dt}"
    resumed = fresh_like(side, name, hp, opts)
    resumed.opt.load_state_dict(sd)
    grads = [draw_grads(side, gen) for _ in range(K2)]
    rng = torch.get_rng_state()
    for s in (side, resumed):
        torch.set_rng_state(rng)
        for g in grads:
            set_grads([s], g)
            s.step()
    assert_sides_bitwise_equal(side, resumed, f"{name} {mode}: resumed from its checkpoint vs uninterrupted")


TORCH_LOAD_MODES = {
    "master_weights-bf16": (BF16, dict(master_weights=True, state_dtype=FP32)),
    "master_weights-fp16": (FP16, dict(master_weights=True, state_dtype=FP32)),
    "master_remainders": (BF16, dict(master_weights=True, master_remainders=True, state_dtype=FP32)),
    "state_dtype_bf16": (FP32, dict(state_dtype=BF16)),
}


@pytest.mark.parametrize("mode", list(TORCH_LOAD_MODES))
@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_torch_checkpoint_loads_into_an_optimizer_with_options(name, hp, mode, device):
    """A torch.optim state_dict (no master entries, moments in the param dtype) loads into an
    optimizer with the options: masters start from the params, moments are cast to state_dtype.
    Checked on the next step against a float32 torch step from those values:
      master modes: the master (float32) equals it within 2 ulp_f32 + 64 eps_f32 * |change| (one
        float32 step, identical inputs: the half moments and param upcast exactly), the param is
        the rounded master, the moments are float32;
      state_dtype=bf16 (float32 params): moments rounded to bf16 at load, so the oracle starts
        from the bf16-rounded moments; tolerances as in test_state_dtype_per_step.
    """
    dtype, opts = TORCH_LOAD_MODES[mode]
    vals = draw(SHAPES, make_gen(171))
    tparams = [leaf(v, dtype, device) for v in vals]
    topt = torch_cls(name)(tparams, **ref_kwargs(hp))
    gen = make_gen(172)
    for _ in range(K1):
        for p in tparams:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        topt.step()
    sd = roundtrip(topt.state_dict())
    fo = Side(None, [leaf(p.detach(), dtype, device) for p in tparams])
    fo.opt = fused_cls(name)(fo.params, **hp, **opts)
    fo.opt.load_state_dict(sd)
    # float32 oracle from the same values (torch's load casts the moments to float32: exact)
    ref = Side(None, [leaf(p.detach(), FP32, device) for p in tparams])
    ref.opt = torch_cls(name)(ref.params, **ref_kwargs(hp))
    ref.opt.load_state_dict(roundtrip(topt.state_dict()))
    if opts.get("state_dtype") == BF16:
        with torch.no_grad():
            for p in ref.params:
                for k, v in ref.opt.state[p].items():
                    if k in MOMENT_KEYS:
                        v.copy_(v.to(BF16).to(FP32))
    before = {i: {k: v.detach().to(FP32).clone() for k, v in ref.opt.state[p].items() if k in MOMENT_KEYS}
              for i, p in enumerate(ref.params)}
    before_p = [p.detach().clone() for p in ref.params]
    feed_same_grads(ref, fo, gen, dtype=dtype, kind="half")
    ref.step()
    fo.step()
    want = expected_entry_dtypes(dtype, opts)
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
        what = f"{name} {mode}: first step after loading a torch checkpoint, param {i}"
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        if "step" in sr:
            assert step_value(sf["step"]) == step_value(sr["step"]) == K1 + 1
        for k, dt in want.items():
            if k in MASTER_KEYS or k in sr:
                assert k in sf, f"{what}: no state[{k!r}]"
                assert sf[k].dtype == dt, f"{what}: state[{k!r}] is {sf[k].dtype}, expected {dt}"
        if opts.get("master_weights"):
            m = master_of(fo, pf)
            assert_f32_step_close(m, pr, before_p[i], f"{what}: master")
            assert_param_is_rounded_master(pf, m, what)
            for k in before[i]:
                assert_f32_step_close(sf[k], sr[k], before[i][k], f"{what}: state[{k!r}]")
        else:
            change = (pr.detach().to(FP64) - before_p[i].to(FP64)).abs()
            extra = torch.finfo(BF16).eps * (change + decay_term(name, fo.opt.param_groups[0], before_p[i].to(FP64)))
            assert_f32_step_close(pf, pr, before_p[i], f"{what}: param", extra)
            for k in before[i]:
                assert_half_step_close(sf[k], sr[k], before[i][k], BF16, f"{what}: state[{k!r}]")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,hp", OPT_CASES, ids=ids_of(OPT_CASES))
def test_checkpoint_with_options_loads_into_torch(name, hp, mode, device):
    """A fusedopt state_dict with the new entries loads into torch.optim (foreach=False), which
    keeps or ignores them, and torch keeps stepping: finite params that move."""
    dtype, opts = MODES[mode]
    side = make_fused(name, hp, opts, dtype=dtype, device=device, seed=181)
    gen = make_gen(182)
    for _ in range(K1):
        set_grads([side], draw_grads(side, gen))
        side.step()
    params = [leaf(p.detach(), dtype, device) for p in side.params]
    topt = torch_cls(name)(params, **ref_kwargs(hp))
    topt.load_state_dict(roundtrip(side.opt.state_dict()))
    start = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        topt.step()
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, start)), "torch did not move any param"
    for p in params:
        assert bool(torch.isfinite(p).all())
        st = topt.state[p]
        if "step" in st:
            assert step_value(st["step"]) == K1 + 3


# ---------------------------------------------------------------------------------------------
# The CPU kernel's two traversals agree bit for bit
#
# A 16-bit or mixed-precision tensor is updated mostly by a register path (roles converted in
# registers, one or two vectors of 8 (AVX2) or 16 (AVX-512) elements a turn); the remaining
# elements, and a tensor shorter than a vector, take the block path (roles converted through L1
# buffers). Both must compute the same bits: the same tensor stepped as one 40-element param (32
# through the registers, 8 through the blocks) and as 40 one-element params (all through the
# blocks) ends identical.

REGISTER_LAYOUTS = [
    pytest.param(torch.bfloat16, {}, id="bf16"),
    pytest.param(torch.float16, {}, id="fp16"),
    pytest.param(torch.bfloat16, dict(master_weights=True), id="bf16-master"),
    pytest.param(torch.bfloat16, dict(master_weights=True, state_dtype=torch.float32), id="bf16-master-fp32-state"),
    pytest.param(torch.float16, dict(master_weights=True, state_dtype=torch.float32), id="fp16-master-fp32-state"),
    pytest.param(torch.bfloat16, dict(master_weights=True, master_remainders=True), id="bf16-remainder"),
    pytest.param(torch.bfloat16, dict(master_weights=True, master_remainders=True, state_dtype=torch.float32),
                 id="bf16-remainder-fp32-state"),
    pytest.param(torch.float32, dict(state_dtype=torch.bfloat16), id="fp32-bf16-state"),
    pytest.param(torch.bfloat16, dict(state_dtype=torch.float16), id="bf16-fp16-state"),
]

REGISTER_OPTIMIZERS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
    ("Adagrad", dict(lr=1e-2)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,kwargs", REGISTER_OPTIMIZERS, ids=[n for n, _ in REGISTER_OPTIMIZERS])
@pytest.mark.parametrize("dtype,options", REGISTER_LAYOUTS)
def test_register_and_block_paths_compute_the_same_bits(name, kwargs, dtype, options):
    import fusedopt

    g = torch.Generator().manual_seed(hash((name, str(dtype), tuple(options))) % 2**31)
    numel = 40
    init = torch.randn(numel, generator=g).to(dtype)
    whole = torch.nn.Parameter(init.clone())
    parts = [torch.nn.Parameter(init[i:i + 1].clone()) for i in range(numel)]
    cls = getattr(fusedopt, name)
    o_whole = cls([whole], **kwargs, **options)
    o_parts = cls(parts, **kwargs, **options)
    for _ in range(4):
        grad = torch.randn(numel, generator=g).to(dtype)
        whole.grad = grad.clone()
        for i, p in enumerate(parts):
            p.grad = grad[i:i + 1].clone()
        o_whole.step()
        o_parts.step()
    assert torch.equal(whole.detach(), torch.cat([p.detach() for p in parts])), "params differ"
    for key, value in o_whole.state[whole].items():
        if torch.is_tensor(value) and value.numel() == numel:
            joined = torch.cat([o_parts.state[p][key] for p in parts])
            assert value.dtype == joined.dtype and torch.equal(value, joined), f"state {key!r} differs"


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_register_path_splits_nan_masters_like_the_block_path(name):
    """A NaN grad makes NaN masters: with remainders, both paths store a NaN param and a zero
    remainder (split_master), and every other element bit for bit the same. (Which NaN the math
    yields, its sign and payload, may differ between the vector and the scalar update, as it
    does between torch's kernels.)"""
    import fusedopt

    g = torch.Generator().manual_seed(7)
    numel = 40
    init = torch.randn(numel, generator=g).to(torch.bfloat16)
    whole = torch.nn.Parameter(init.clone())
    parts = [torch.nn.Parameter(init[i:i + 1].clone()) for i in range(numel)]
    kwargs = dict(lr=1e-2, master_weights=True, master_remainders=True)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    o_whole = getattr(fusedopt, name)([whole], **kwargs)
    o_parts = getattr(fusedopt, name)(parts, **kwargs)
    for step in range(3):
        grad = torch.randn(numel, generator=g).to(torch.bfloat16)
        if step == 1:
            grad[[3, 17, 35]] = float("nan")  # in the registers' vectors and in the block tail
        whole.grad = grad.clone()
        for i, p in enumerate(parts):
            p.grad = grad[i:i + 1].clone()
        o_whole.step()
        o_parts.step()
    joined = torch.cat([p.detach() for p in parts])
    nan = whole.detach().isnan()
    assert nan.sum() == 3 and torch.equal(nan, joined.isnan())
    assert torch.equal(whole.detach()[~nan].view(torch.int16), joined[~nan].view(torch.int16))
    rem = o_whole.state[whole]["master_remainder"]
    assert torch.equal(rem, torch.cat([o_parts.state[p]["master_remainder"] for p in parts]))
    assert (rem[whole.detach().isnan()] == 0).all()


@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_a_refused_param_group_is_not_added(name):
    """add_param_group with params the precision options refuse (float16 params with bfloat16
    master remainders) raises and leaves the optimizer as it was, as torch.optim's refusals do:
    the later steps run, and the same params can be added once made right."""
    import fusedopt

    cls = getattr(fusedopt, name)
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = cls([p], lr=1e-2, master_weights=True, master_remainders=True)
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": [q]})
    assert len(opt.param_groups) == 1
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert q not in opt.state and len(opt.state[p]) > 0
    q.data = q.data.to(torch.bfloat16)
    q.grad = torch.ones_like(q)
    opt.add_param_group({"params": [q]})
    opt.step()
    assert "master_remainder" in opt.state[q]


MASTER_OPTS = {"master": dict(master_weights=True), "remainders": dict(master_weights=True, master_remainders=True)}


def _bf16_master_run(cls, kw, mode, *, numel, steps, seed):
    """(param, optimizer, generator) after `steps` steps of a bfloat16 param in master `mode`."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(numel, generator=g).to(torch.bfloat16))
    opt = cls([p], **kw, **MASTER_OPTS[mode])
    for _ in range(steps):
        p.grad = torch.randn(numel, generator=g).to(torch.bfloat16)
        opt.step()
    return p, opt, g


@pytest.mark.parametrize("saved,loaded", [("master", "remainders"), ("remainders", "master")])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_checkpoint_loads_across_master_modes_exactly(name, saved, loaded):
    """A checkpoint of a master_weights run loaded into a master_remainders one (and back) holds
    the master exactly: it is converted (param rounded to nearest, ties away, plus the low 16
    bits; or joined back), the other mode's entry is not kept, and the run continues
    bit-identically to the one that saved it."""
    import io

    import fusedopt

    cls = getattr(fusedopt, name)
    kw = dict(lr=1e-2, weight_decay=0.01) if name == "AdamW" else dict(lr=1e-2, momentum=0.9)
    p, a, g = _bf16_master_run(cls, kw, saved, numel=257, steps=3, seed=3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    b = cls([q], **kw, **MASTER_OPTS[loaded])
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        grad = torch.randn(257, generator=g).to(torch.bfloat16)
        p.grad, q.grad = grad, grad.clone()
        a.step()
        b.step()
        assert torch.equal(p, q)
    want, other = ("master_param", "master_remainder") if loaded == "master" else ("master_remainder", "master_param")
    assert want in b.state[q] and other not in b.state[q]
    master_a = a.state[p]["master_param"] if saved == "master" else None
    if master_a is not None:  # the masters agree bit for bit
        from fusedopt.optim._fused import _join_master

        master_b = b.state[q]["master_param"] if loaded == "master" else _join_master(q.detach(), b.state[q]["master_remainder"])
        assert torch.equal(master_a, master_b)


@pytest.mark.parametrize("middle", ["fusedopt", "torch"])
@pytest.mark.parametrize("saved", ["master", "remainders"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.5)), ("SGD", dict(lr=0.5, momentum=0.9)),
                                     ("AdamW", dict(lr=0.1))], ids=["SGD", "SGD-momentum", "AdamW"])
def test_a_run_resumed_without_masters_does_not_resume_from_their_stale_ones(name, kw, saved, middle):
    """master_weights run -> resumed by an optimizer without masters (fusedopt's, or torch.optim's,
    which casts the master entries to the param's dtype and keeps them) -> resumed with masters
    again. The middle run moved the params but not the masters: the last run must go on from the
    params, not roll them back to the first run's masters (nor refuse a master torch cast)."""
    import fusedopt

    cls = getattr(fusedopt, name)
    p, first, g = _bf16_master_run(cls, kw, saved, numel=64, steps=2, seed=5)
    q = torch.nn.Parameter(p.detach().clone())
    mid = (cls if middle == "fusedopt" else getattr(torch.optim, name))([q], **kw)
    mid.load_state_dict(first.state_dict())
    for _ in range(3):
        q.grad = torch.randn(64, generator=g).to(torch.bfloat16)
        mid.step()
    assert not torch.equal(q, p)  # the middle run moved the params
    saved_mid = mid.state_dict()
    # the reference: the middle run's state without any master entry (masters start from the params)
    without_masters = {**saved_mid, "state": {k: {n: v for n, v in st.items() if not n.startswith("master")}
                                              for k, st in saved_mid["state"].items()}}
    runs = []
    for sd in (saved_mid, without_masters):
        r = torch.nn.Parameter(q.detach().clone())
        last = cls([r], **kw, **MASTER_OPTS[saved])
        last.load_state_dict(copy.deepcopy(sd))  # (loading shares state tensors with the dict)
        r.grad = torch.zeros_like(r)
        last.step()
        runs.append(r.detach())
    assert torch.equal(runs[0], runs[1]), "the params were rolled back to a stale master"
