"""Helpers for the RMSprop / Adagrad / Lion tests (test_new_optimizers.py).

RMSprop and Adagrad have a torch.optim oracle (``foreach=False``; ``fused=False`` where the class
has that argument - torch.optim.RMSprop has no ``fused``).  Lion has none: ``LionRef`` below is an
independent reference written from the paper's pseudo-code (Chen et al. 2023, "Symbolic Discovery
of Optimization Algorithms", Program 1) that evaluates every step in float64 and rounds the results
to the param dtype once.  The comparison machinery (tolerances, magnitude tracking, the
half-precision re-synced per-step comparison) is the one of optim_parity_utils.
"""

from __future__ import annotations

import inspect

import torch

from optim_parity_utils import run_half_parity as _run_half_parity
from optim_parity_utils import (
    MagnitudeTracker,
    Side,
    assert_close_dtype,
    assert_grads_untouched,
    copy_hparams,
    draw_like,
    feed_same_grads,
    leaf,
    make_gen,
    state_of,
    step_value,
    ulp,
)

NEW_NAMES = ("RMSprop", "Adagrad", "Lion")


# --------------------------------------------------------------------------------------------
# the independent Lion reference
# --------------------------------------------------------------------------------------------
class LionRef(torch.optim.Optimizer):
    """Lion exactly as the paper's pseudo-code, evaluated in float64 (one rounding to the param
    dtype per step for params and exp_avg):

        g = -grad if maximize else grad
        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lr * wd) - lr * sign(c)      (decoupled weight decay; sign(0) = 0)
        m = beta2 * m + (1 - beta2) * g

    State: ``exp_avg`` (m, zero-initialised, param dtype).  No step counter (the rule has none).
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            b1, b2 = (float(b) for b in group["betas"])
            wd = float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = p.grad.detach().to(torch.float64)
                if group["maximize"]:
                    g = -g
                m = st["exp_avg"].to(torch.float64)
                c = b1 * m + (1 - b1) * g
                p.copy_(p.detach().to(torch.float64) * (1 - lr * wd) - lr * torch.sign(c))
                st["exp_avg"].copy_(b2 * m + (1 - b2) * g)
        return loss


# --------------------------------------------------------------------------------------------
# classes and constructor kwargs
# --------------------------------------------------------------------------------------------
def fused_cls(name):
    import fusedopt

    return getattr(fusedopt, name)


def ref_cls(name):
    return LionRef if name == "Lion" else getattr(torch.optim, name)


def ref_kwargs(name, kwargs):
    """The oracle's constructor kwargs: same hyperparameters, torch's for-loop implementation.
    ``capturable`` is dropped: it only says where torch keeps ``step`` (its for-loop refuses
    capturable=True on the CPU), never what the update computes."""
    kw = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable")}
    if name == "Lion":
        return kw
    params = inspect.signature(ref_cls(name).__init__).parameters
    kw["foreach"] = False
    if "fused" in params:
        kw["fused"] = False
    return kw


def ref_group(name, hp):
    return {k: v for k, v in hp.items() if k not in ("foreach", "fused", "capturable")}


def build_pair(name, group_specs, *, dtype, device, ctor=None, seed=0, ref_dtype=None):
    """(oracle Side, fusedopt Side) over identical initial params: one param group per
    (shapes, hyperparams) entry; see optim_parity_utils.build_pair."""
    ctor = dict(ctor or {})
    ref_dtype = ref_dtype or dtype
    gen = make_gen(seed)
    ref_groups, fo_groups, ref_params, fo_params = [], [], [], []
    for shapes, hp in group_specs:
        vals = draw_like(shapes, dtype, gen)
        fo_ps = [leaf(v, dtype, device) for v in vals]
        ref_ps = [leaf(p.detach(), ref_dtype, device) for p in fo_ps]
        fo_groups.append({"params": fo_ps, **copy_hparams(hp)})
        ref_groups.append({"params": ref_ps, **copy_hparams(ref_group(name, hp))})
        fo_params += fo_ps
        ref_params += ref_ps
    ref = ref_cls(name)(ref_groups, **ref_kwargs(name, copy_hparams(ctor)))
    fo = fused_cls(name)(fo_groups, **copy_hparams(ctor))
    return Side(ref, ref_params), Side(fo, fo_params)


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def lion_step_count_ok(fo, p, n, what):
    """fusedopt.Lion may keep a ``step`` counter (the paper's rule has none; torch's convention
    would add one).  If it does, it is a float 0-dim tensor counting the real steps."""
    st = state_of(fo.opt, p)
    if "step" in st:
        assert step_value(st["step"]) == n, f"{what}: Lion state['step'] = {float(st['step'])}, expected {n}"


def assert_lion_state_keys(st, p, what):
    keys = set(st)
    assert "exp_avg" in keys and keys <= {"exp_avg", "step"}, f"{what}: Lion state keys {sorted(keys)}, expected exp_avg (+ optional step)"
    m = st["exp_avg"]
    assert torch.is_tensor(m) and m.dtype == p.dtype and m.shape == p.shape and m.device == p.device, (
        f"{what}: exp_avg {m.dtype} {tuple(m.shape)} on {m.device}; param {p.dtype} {tuple(p.shape)} on {p.device}")


def assert_pair_close_any(name, ref, fo, dtype, what="", tracker=None, tolerate_pristine=False):
    """Params and every state tensor of fusedopt equal the oracle's within the dtype tolerance
    (optim_parity_utils.assert_close_dtype); same state keys, dtypes, shapes, devices and step
    counts as torch.  Lion: params + exp_avg (its optional ``step`` is checked by the callers that
    know the count).  tolerate_pristine: where the oracle has no state, a pristine fusedopt state
    (see is_pristine_state) is accepted."""

    def sc(i, k):
        return tracker.get(i, k) if tracker is not None else None

    for i, (pr, pf) in enumerate(zip(ref.params, fo.params, strict=True)):
        w = f"{what}: param {i} {tuple(pf.shape)}"
        assert_close_dtype(pf, pr, dtype, w, sc(i, "param"))
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        if not sr and sf and (tolerate_pristine or name == "Lion") and is_pristine_state(name, sf):
            continue
        if name == "Lion":
            if not sr:
                assert not sf, f"{w}: fusedopt has state {sorted(sf)}, the reference none"
                continue
            assert_lion_state_keys(sf, pf, w)
            assert_close_dtype(sf["exp_avg"], sr["exp_avg"], dtype, f"{w} exp_avg", sc(i, "exp_avg"))
            continue
        assert set(sf) == set(sr), f"{w}: fusedopt state keys {sorted(sf)} != torch {sorted(sr)}"
        for k, vr in sr.items():
            vf = sf[k]
            if k == "step":
                assert step_value(vf) == step_value(vr), f"{w}: step {float(vf)} != torch {float(vr)}"
                continue
            assert torch.is_tensor(vf), f"{w}: state[{k!r}] is {type(vf).__name__}"
            assert vf.dtype == vr.dtype, f"{w}: state[{k!r}] dtype {vf.dtype} != torch {vr.dtype}"
            assert vf.shape == vr.shape, f"{w}: state[{k!r}] shape {tuple(vf.shape)} != {tuple(vr.shape)}"
            assert vf.device == pf.device, f"{w}: state[{k!r}] on {vf.device}, param on {pf.device}"
            assert_close_dtype(vf, vr, dtype, f"{w} state[{k!r}]", sc(i, k))


def is_pristine_state(name, st):
    """State equivalent to no state at all: step 0 (if kept) and every tensor all-zero (RMSprop's
    square_avg / momentum_buffer / grad_avg and Lion's exp_avg are zero-initialised, so such a state
    gives exactly the first real step of a fresh one).  Never for Adagrad: torch creates its state
    at construction, so the oracle always has one to compare with."""
    if not st or name == "Adagrad":
        return False
    if "step" in st and float(st["step"]) != 0:
        return False
    return all(torch.count_nonzero(v) == 0 for k, v in st.items() if k != "step" and torch.is_tensor(v))


# --------------------------------------------------------------------------------------------
# drivers
# --------------------------------------------------------------------------------------------
def run_parity(name, group_specs, *, dtype, device, steps, ctor=None, seed=1234, check_every=10, grad_mask_fn=None):
    """Full-precision side-by-side run (see optim_parity_utils.run_parity)."""
    ref, fo = build_pair(name, group_specs, dtype=dtype, device=device, ctor=ctor, seed=seed)
    gen = make_gen(seed + 1)
    tracker = MagnitudeTracker()
    tracker.update(ref)
    for t in range(1, steps + 1):
        mask = grad_mask_fn(t, len(fo.params)) if grad_mask_fn else None
        grads = feed_same_grads(ref, fo, gen, dtype=dtype, mask=mask)
        ref.step()
        fo.step()
        tracker.update(ref)
        assert_grads_untouched(fo, grads, f"{name} step {t}")
        if t == 1 or t % check_every == 0 or t == steps:
            assert_pair_close_any(name, ref, fo, dtype, f"{name} {dtype} {device} after step {t}", tracker=tracker)
    return ref, fo


def run_half_parity(name, group_specs, *, dtype, device, steps, ctor=None, seed=1234):
    """fusedopt on bf16/fp16 params vs the float32 oracle re-synced to fusedopt's state before
    every step (optim_parity_utils.run_half_parity, with this module's pair builder)."""
    return _run_half_parity(name, group_specs, dtype=dtype, device=device, steps=steps, ctor=ctor,
                            seed=seed, build=build_pair)


# --------------------------------------------------------------------------------------------
# Lion: one step of fusedopt against the paper's rule in float64 from fusedopt's own state
# --------------------------------------------------------------------------------------------
def _compute_eps(dtype):
    """eps of the type a fused kernel computes in: float32 for float32 and the half types."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def lion_snapshot(fo):
    return [
        (p.detach().clone(), state_of(fo.opt, p)["exp_avg"].detach().clone() if "exp_avg" in state_of(fo.opt, p) else None)
        for p in fo.params
    ]


def _group_of(opt, p):
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise KeyError("param not in optimizer")


def assert_lion_step(fo, before, grads, dtype, what):
    """fusedopt's Lion step from (p0, m0, g) against the paper's rule evaluated in float64.

    Tolerance (per step, no compounding: the reference starts from fusedopt's own values).
      * The result is rounded to ``dtype`` once: 0.5 ulp; an evaluation-order difference in the
        compute type can move it across a rounding boundary: 1 more; hence 2 ulp(expected).
      * Intermediates (1 - lr*wd, beta*m, lr*sign) rounded in the compute type (float32 for
        float32/bf16, float64 for float64) contribute ~eps_c of the *operands* each, which can be
        many ulps of a result that is small by cancellation: + 4 eps_c * (sum of |operands|).
      * sign(c) is only well defined when c is not within rounding noise of 0: where
        |c| <= band * (|beta1*m| + |(1-beta1)*g|) both sign(c) and 0 are accepted (the param may
        move by anything in [-lr, lr] around the decayed value).  band = 16 eps_c, and 2 eps_bf16
        for bf16 (an implementation rounding c to the param type flips only those signs).
    A wrong beta, lr, weight decay form (coupled vs decoupled), maximize or m update changes the
    param by ~lr (1e-3 here) or m by ~1e-3 |g|: 10^3 - 10^4 times these tolerances.
    """
    ec = _compute_eps(dtype)
    band = 2 * torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 16 * ec
    for i, (p, (p0, m0), g) in enumerate(zip(fo.params, before, grads, strict=True)):
        st = state_of(fo.opt, p)
        if g is None:
            assert torch.equal(p.detach(), p0), f"{what}: param {i} has no grad but changed"
            continue
        grp = _group_of(fo.opt, p)
        lr, wd = float(grp["lr"]), float(grp["weight_decay"])
        b1, b2 = (float(b) for b in grp["betas"])
        P0 = p0.to(torch.float64)
        M0 = m0.to(torch.float64) if m0 is not None else torch.zeros_like(P0)
        G = g.to(torch.float64)
        if grp["maximize"]:
            G = -G
        c = b1 * M0 + (1 - b1) * G
        decayed = P0 * (1 - lr * wd)
        exp_p = decayed - lr * torch.sign(c)
        exp_m = b2 * M0 + (1 - b2) * G
        assert_lion_state_keys(st, p, f"{what}: param {i}")
        act_p = p.detach().to(torch.float64)
        act_m = st["exp_avg"].detach().to(torch.float64)
        tol_p = 2 * ulp(exp_p, dtype) + 4 * ec * (P0.abs() + lr)
        tol_m = 2 * ulp(exp_m, dtype) + 4 * ec * ((b2 * M0).abs() + ((1 - b2) * G).abs())
        ambiguous = c.abs() <= band * ((b1 * M0).abs() + ((1 - b1) * G).abs())
        ok_p = (act_p - exp_p).abs() <= tol_p
        ok_p |= ambiguous & ((act_p - decayed).abs() <= lr + tol_p)
        ok_m = (act_m - exp_m).abs() <= tol_m
        for ok, act, exp, tol, key in ((ok_p, act_p, exp_p, tol_p, "param"), (ok_m, act_m, exp_m, tol_m, "exp_avg")):
            if not bool(ok.all()):
                j = (~ok).flatten().nonzero()[0].item()
                raise AssertionError(
                    f"{what}: param {i} {tuple(p.shape)} {key}: {int((~ok).sum())}/{ok.numel()} elements off the paper's "
                    f"rule; first at {j}: fusedopt={act.flatten()[j].item():.10g} expected={exp.flatten()[j].item():.10g} "
                    f"(p0={P0.flatten()[j].item():.8g} m0={M0.flatten()[j].item():.8g} g={G.flatten()[j].item():.8g} "
                    f"c={c.flatten()[j].item():.3g}) tol={tol.flatten()[j].item():.3g}")
