"""Helpers for the fusedopt parity suite: build a torch oracle and a fusedopt optimizer over
identical parameters, feed both the same gradients, and compare params/state with tolerances
argued from the dtype (see ``float_tolerance`` and ``assert_half_step_close``).

The oracle is always ``torch.optim.<Name>(..., foreach=False, fused=False)``.
"""

from __future__ import annotations

import copy
import io

import torch

OPT_NAMES = ("SGD", "Adam", "AdamW")


# --------------------------------------------------------------------------------------------
# classes
# --------------------------------------------------------------------------------------------
def torch_cls(name):
    return getattr(torch.optim, name)


def fused_cls(name):
    import fusedopt

    return getattr(fusedopt, name)


def ref_kwargs(kwargs):
    """Constructor kwargs for the oracle: same hyperparameters, for-loop implementation."""
    kw = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    kw["foreach"] = False
    kw["fused"] = False
    return kw


def copy_hparams(hp):
    """Deep copy of a hyperparameter dict; tensors (tensor lr / betas) are cloned so that the
    two optimizers never share a tensor (schedulers update tensor lrs in place)."""
    out = {}
    for k, v in hp.items():
        if torch.is_tensor(v):
            out[k] = v.detach().clone()
        elif isinstance(v, tuple):
            out[k] = tuple(x.detach().clone() if torch.is_tensor(x) else x for x in v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_gen(seed):
    return torch.Generator().manual_seed(seed)


def draw(shapes, gen, kind="normal"):
    """float64 CPU tensors drawn from ``gen`` (so every optimizer/device/dtype gets the same data).

    kind="normal": N(0, 1).
    kind="half":   random sign * U(0.5, 2): keeps g*g*(1-beta2) inside the fp16 *normal* range, so
                   the half-precision comparison is about rounding of the optimizer math and not
                   about fp16 subnormals (see assert_half_step_close).
    """
    out = []
    for s in shapes:
        if kind == "normal":
            out.append(torch.randn(s, generator=gen, dtype=torch.float64))
        elif kind == "half":
            mag = 0.5 + 1.5 * torch.rand(s, generator=gen, dtype=torch.float64)
            sign = torch.randint(0, 2, s, generator=gen).to(torch.float64) * 2 - 1
            out.append(mag * sign)
        else:
            raise ValueError(kind)
    return out


def draw_like(shapes, dtype, gen, kind="normal"):
    """Like draw(), but complex dtypes get independent real and imaginary parts."""
    if dtype.is_complex:
        return [torch.view_as_complex(v) for v in draw([tuple(s) + (2,) for s in shapes], gen, kind)]
    return draw(shapes, gen, kind)


def leaf(value, dtype, device):
    """A fresh leaf tensor requiring grad (always a copy, never aliasing ``value``)."""
    return value.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)


def roundtrip(obj):
    """torch.save / torch.load (weights_only=True, the torch default) round trip, like a checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------
# building a (oracle, fusedopt) pair
# --------------------------------------------------------------------------------------------
class Side:
    """One optimizer and its flat parameter list (in param_group order)."""

    def __init__(self, opt, params):
        self.opt = opt
        self.params = params

    def set_grads(self, grads):
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g.clone()

    def step(self, *a, **k):
        return self.opt.step(*a, **k)


def build_pair(
    name,
    group_specs,
    *,
    dtype,
    device,
    ctor=None,
    seed=0,
    ref_dtype=None,
):
    """Return (ref: Side, fo: Side) over identical initial parameters.

    group_specs: list of (shapes, hyperparams) - one param group each (hyperparams may be {}).
    ctor: constructor kwargs shared by both (the oracle additionally gets foreach=False, fused=False).
    ref_dtype: dtype of the oracle's params (float32 for the half-precision tests: the oracle runs on
               the *upcast* half values).
    """
    ctor = dict(ctor or {})
    ref_dtype = ref_dtype or dtype
    gen = make_gen(seed)
    ref_groups, fo_groups, ref_params, fo_params = [], [], [], []
    for shapes, hp in group_specs:
        vals = draw_like(shapes, dtype, gen)
        fo_ps = [leaf(v, dtype, device) for v in vals]
        # oracle starts from exactly the values fusedopt starts from (after rounding to `dtype`)
        ref_ps = [leaf(p.detach(), ref_dtype, device) for p in fo_ps]
        fo_groups.append({"params": fo_ps, **copy_hparams(hp)})
        ref_groups.append({"params": ref_ps, **copy_hparams(hp)})
        fo_params += fo_ps
        ref_params += ref_ps
    ref = torch_cls(name)(ref_groups, **ref_kwargs(copy_hparams(ctor)))
    fo = fused_cls(name)(fo_groups, **copy_hparams(ctor))
    return Side(ref, ref_params), Side(fo, fo_params)


def feed_same_grads(ref, fo, gen, *, dtype, kind="normal", mask=None):
    """Draw one gradient per parameter and give both sides the same values.

    fusedopt gets them in its param dtype, the oracle gets exactly those values in its own dtype
    (upcast for the half tests).  ``mask[i] is False`` leaves param i without a grad.
    Returns the list of grads given to fusedopt (for the 'grads untouched' check).
    """
    vals = [draw_like([tuple(p.shape)], p.dtype, gen, kind)[0] for p in fo.params]
    fo_grads = []
    for i, (pr, pf, v) in enumerate(zip(ref.params, fo.params, vals, strict=True)):
        if mask is not None and not mask[i]:
            pr.grad = None
            pf.grad = None
            fo_grads.append(None)
            continue
        gf = v.to(device=pf.device, dtype=pf.dtype)
        pf.grad = gf.clone()
        pr.grad = gf.to(device=pr.device, dtype=pr.dtype).clone()
        fo_grads.append(gf.clone())
    return fo_grads


def assert_grads_untouched(fo, grads_before, what=""):
    """torch.optim never writes into p.grad; a drop-in must not either."""
    for i, (p, g) in enumerate(zip(fo.params, grads_before, strict=True)):
        if g is None:
            assert p.grad is None, f"{what}: param {i} had no grad, step() gave it one"
            continue
        assert p.grad is not None, f"{what}: step() removed the grad of param {i}"
        assert torch.equal(p.grad, g), f"{what}: step() modified p.grad of param {i} in place"


# --------------------------------------------------------------------------------------------
# tolerances and comparisons
# --------------------------------------------------------------------------------------------
def float_tolerance(dtype):
    """Relative tolerance for a full-precision run compared after N steps.

    float32: 1e-6.  Both implementations evaluate the same formulas in float32 (or fusedopt in a
      wider type and rounds once); they differ only by operation order / FMA contraction / where
      intermediate roundings happen, i.e. by ~1 ulp (2**-23 ~ 1.2e-7 relative) of the parameter per
      step plus a few eps of the *update*.  The gradients fed here do not depend on the params, so
      those per-step differences do not feed back; they random-walk: ~sqrt(N) * 0.6e-7 ~ 5e-7 after
      50-60 steps for the worst of ~10k elements (calibrated against an exact "compute in float64,
      round once per step" implementation: worst element 0.8x of this bound).  rtol=1e-6 is
      therefore ~2x the expected worst case and ~10x below the effect of any real algorithmic
      difference (e.g. a 1e-5 change of lr, beta or a missing bias-correction factor).
      atol = 1e-6 * (largest magnitude the tensor had during the run) covers elements that are
      close to 0 now: their absolute error was accumulated while they (or the update) were
      larger, so it is set by those ulps and not by the final value (e.g. a (1,) param that
      travelled from 1.0 to 0.01 carries ~1e-8 of absolute rounding noise, 1e-6 relative to 0.01).
    float64: 1e-12: the same argument with eps = 2**-52 gives ~1e-15; 1e-12 leaves 3 orders of
      magnitude and still catches any difference that is not rounding.
    complex: the tolerance of the real dtype of its components.
    """
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    if real == torch.float32:
        return 1e-6
    if real == torch.float64:
        return 1e-12
    raise ValueError(f"no full-run tolerance for {dtype}; use assert_half_step_close")


def assert_close_dtype(actual, expected, dtype, what, scale=None):
    """rtol = float_tolerance(dtype); atol = rtol * scale, where scale is the largest magnitude the
    expected tensor had along the run (see MagnitudeTracker), at least max|expected| now."""
    rt = float_tolerance(dtype)
    exp = expected.detach()
    now = exp.abs().max().item() if exp.numel() else 0.0
    scale = max(now, scale or 0.0)
    atol = rt * scale if scale > 0 else 1e-30
    act = actual.detach()
    if act.shape == exp.shape and act.dtype == exp.dtype and act.device == exp.device:
        # fast path (same criterion as assert_close); assert_close below only builds the message
        if bool(((act - exp).abs() <= atol + rt * exp.abs()).all()):
            return
    torch.testing.assert_close(
        actual.detach(),
        exp,
        rtol=rt,
        atol=atol,
        msg=lambda m: f"{what}: fusedopt vs torch.optim (rtol={rt}, atol={atol:.3g})\n{m}",
    )


def state_of(opt, p):
    """Per-param state without creating an entry (opt.state is a defaultdict)."""
    return opt.state[p] if p in opt.state else {}


def step_value(step):
    assert torch.is_tensor(step), f"state['step'] must stay a tensor, got {type(step).__name__}"
    assert step.dim() == 0, f"state['step'] must be a 0-dim tensor, got shape {tuple(step.shape)}"
    assert step.is_floating_point(), f"state['step'] must be a float tensor like torch's, got {step.dtype}"
    return float(step.item())


def is_pristine_adam_state(st):
    """Adam state with step == 0 and all-zero moments: equivalent to no state at all (the next
    real step does step=1, exp_avg = lerp(0, g, 1-beta1), ...), as torch's own fused Adam leaves
    behind after a GradScaler-skipped first step."""
    return (
        "step" in st
        and "momentum_buffer" not in st
        and float(st["step"]) == 0
        and all(torch.count_nonzero(v) == 0 for k, v in st.items() if k != "step")
    )


def assert_same_state_keys(ref, fo, what="", tolerate_pristine=False):
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params, strict=True)):
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        if tolerate_pristine and not sr and sf and is_pristine_adam_state(sf):
            continue
        kr, kf = set(sr), set(sf)
        assert kf == kr, f"{what}: param {i}: fusedopt state keys {sorted(kf)} != torch {sorted(kr)}"


class MagnitudeTracker:
    """Largest max|x| seen so far for every oracle param / state tensor (the atol scale)."""

    def __init__(self):
        self.m = {}

    def update(self, side):
        for i, p in enumerate(side.params):
            self._see((i, "param"), p)
            for k, v in state_of(side.opt, p).items():
                if k != "step" and torch.is_tensor(v):
                    self._see((i, k), v)

    def _see(self, key, t):
        if t.numel():
            v = t.detach().abs().max().item()
            self.m[key] = max(self.m.get(key, 0.0), v)

    def get(self, i, k):
        return self.m.get((i, k), 0.0)


def assert_pair_close(ref, fo, dtype, what="", check_state=True, tracker=None, tolerate_pristine=False):
    """Params and every state tensor of fusedopt equal torch's within the dtype tolerance; steps equal."""

    def sc(i, k):
        return tracker.get(i, k) if tracker is not None else None

    for i, (pr, pf) in enumerate(zip(ref.params, fo.params, strict=True)):
        assert_close_dtype(pf, pr, dtype, f"{what}: param {i} {tuple(pf.shape)}", sc(i, "param"))
    if not check_state:
        return
    assert_same_state_keys(ref, fo, what, tolerate_pristine)
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params, strict=True)):
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        for k, vr in sr.items():
            vf = sf[k]
            if k == "step":
                assert step_value(vf) == step_value(vr), f"{what}: param {i}: step {float(vf)} != torch {float(vr)}"
            elif torch.is_tensor(vr):
                assert torch.is_tensor(vf), f"{what}: param {i}: state[{k!r}] is {type(vf).__name__}"
                assert vf.dtype == vr.dtype, f"{what}: param {i}: state[{k!r}] dtype {vf.dtype} != torch {vr.dtype}"
                assert vf.shape == vr.shape, f"{what}: param {i}: state[{k!r}] shape {tuple(vf.shape)} != {tuple(vr.shape)}"
                assert vf.device == pf.device, f"{what}: param {i}: state[{k!r}] on {vf.device}, param on {pf.device}"
                assert_close_dtype(vf, vr, dtype, f"{what}: param {i} state[{k!r}]", sc(i, k))
            else:
                assert vf == vr, f"{what}: param {i}: state[{k!r}] {vf!r} != torch {vr!r}"


# --------------------------------------------------------------------------------------------
# half precision: per-step comparison against a float32 oracle re-synced to fusedopt's state
# --------------------------------------------------------------------------------------------
def ulp(x, dtype):
    """Spacing of ``dtype`` numbers at |x| (x given in float32/float64): 2**floor(log2|x|) * eps,
    floored at the subnormal spacing."""
    fi = torch.finfo(dtype)
    ax = x.detach().abs().to(torch.float64).clamp_min(fi.smallest_normal)
    _, e = torch.frexp(ax)  # ax = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(ax), e - 1) * fi.eps


def assert_half_step_close(actual, expected, before, dtype, what):
    """Compare one fused half-precision step with the float32 oracle step from the same inputs.

    Argument.  Before each step the float32 oracle is re-synced to fusedopt's current half values
    (params and state, exactly representable in float32), so both start the step from identical
    numbers and only the step's own rounding is compared (no compounding over steps; comparing
    whole runs instead would have to allow N_steps * ulps, which hides real errors).
      * A fused kernel loads the half values, computes in float32 and rounds each result to the
        half type ONCE: <= 0.5 ulp of the half type.  A float32 evaluation-order difference can
        move a value across a rounding boundary: one more ulp.  Hence 2 ulp(expected).
      * Under cancellation (e.g. momentum_buffer = 0.9*buf + 0.9*g ~ 0) the result can be far
        below its operands, and float32 evaluation-order noise (~2**-24 of the *operands*) is
        then many half ulps of the tiny result.  The operands are of the size of the change
        |expected - before|, so allow 64 * eps_float32 * |expected - before| (7.6e-6 relative).
    Not allowed: torch's for-loop behaviour of rounding to the half type after every op (or
    rounding the new exp_avg / exp_avg_sq / buffer to half before using it) - that costs up to
    eps_half * |update| (2**-8 for bf16, 2**-11 for fp16), 500x more than the second term - nor
    any hyperparameter / formula error larger than ~2 ulp of the param per step.
    Gradients are drawn with |g| in [0.5, 2], keeping exp_avg_sq in the fp16 normal range.
    """
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype} (torch keeps state in the param dtype)"
    exp = expected.detach().to(torch.float64)
    act = actual.detach().to(torch.float64)
    old = before.detach().to(torch.float64) if before is not None else torch.zeros_like(exp)
    tol = 2 * ulp(exp, dtype) + 64 * torch.finfo(torch.float32).eps * (exp - old).abs()
    err = (act - exp).abs()
    finite_ok = torch.isfinite(act) == torch.isfinite(exp)
    bad = (~finite_ok) | (err > tol)
    if bad.any():
        idx = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements beyond 2 ulp of {dtype} (+ 64 eps_f32 * |change|); "
            f"first at flat index {idx}: fusedopt={act.flatten()[idx].item():.8g} "
            f"oracle(float32)={exp.flatten()[idx].item():.8g} before={old.flatten()[idx].item():.8g} "
            f"tol={tol.flatten()[idx].item():.3g}; max err/tol={(err / tol).max().item():.3g}"
        )


def resync_oracle(ref, fo):
    """Copy fusedopt's params and state (upcast) into the float32 oracle."""
    with torch.no_grad():
        for pr, pf in zip(ref.params, fo.params, strict=True):
            pr.copy_(pf.detach().to(pr.dtype))
            sf = state_of(fo.opt, pf)
            if not sf:
                ref.opt.state.pop(pr, None)
                continue
            new = {}
            for k, v in sf.items():
                if k == "step":
                    new[k] = torch.tensor(float(v), dtype=torch.float32)
                elif torch.is_tensor(v):
                    new[k] = v.detach().to(device=pr.device, dtype=pr.dtype).clone()
                else:
                    new[k] = v
            ref.opt.state[pr] = new


def half_snapshot(side):
    """{param index: {'param': tensor, state key: tensor}} of one side, cloned."""
    out = {}
    for i, p in enumerate(side.params):
        d = {"param": p.detach().clone()}
        for k, v in state_of(side.opt, p).items():
            if k != "step" and torch.is_tensor(v):
                d[k] = v.detach().clone()
            elif k == "step":
                d[k] = float(v)
        out[i] = d
    return out


def assert_half_pair_step(ref, fo, before, dtype, what):
    """After one step of both sides (oracle re-synced before it), compare every tensor."""
    assert_same_state_keys(ref, fo, what)
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params, strict=True)):
        b = before[i]
        assert_half_step_close(pf, pr, b["param"], dtype, f"{what}: param {i} {tuple(pf.shape)}")
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        for k, vr in sr.items():
            if k == "step":
                assert step_value(sf[k]) == step_value(vr), f"{what}: param {i}: step {float(sf[k])} != {float(vr)}"
            else:
                assert sf[k].shape == vr.shape
                assert sf[k].device == pf.device
                assert_half_step_close(sf[k], vr, b.get(k), dtype, f"{what}: param {i} state[{k!r}]")


# --------------------------------------------------------------------------------------------
# generic driver
# --------------------------------------------------------------------------------------------
def run_parity(name, group_specs, *, dtype, device, steps, ctor=None, seed=1234, check_every=10, grad_mask_fn=None):
    """Full-precision side-by-side run: same grads each step, compare params+state every
    ``check_every`` steps and at the end; also checks fusedopt never modifies p.grad."""
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
            assert_pair_close(ref, fo, dtype, f"{name} {dtype} {device} after step {t}", tracker=tracker)
    return ref, fo


def run_with_edits(name, group_specs, *, dtype, device, ctor, seed, steps, edit, what):
    """Steps a (torch, fusedopt) pair on the same grads, calling ``edit(t, side)`` on both sides
    before each step t, and checks parity after every step."""
    ref, fo = build_pair(name, group_specs, dtype=dtype, device=device, ctor=ctor)
    gen = make_gen(seed)
    tracker = MagnitudeTracker()
    for t in range(steps):
        for side in (ref, fo):
            edit(t, side)
        feed_same_grads(ref, fo, gen, dtype=dtype)
        ref.step()
        fo.step()
        tracker.update(ref)
        assert_pair_close(ref, fo, dtype, f"step {t} ({what})", tracker=tracker)
    return ref, fo


def run_half_parity(name, group_specs, *, dtype, device, steps, ctor=None, seed=1234, build=None):
    """Half-precision run: fusedopt on fp16/bf16 params, float32 oracle re-synced every step.
    ``build``: the pair builder (default ``build_pair``; new_optim_utils passes its own, which
    knows Lion's oracle)."""
    ref, fo = (build or build_pair)(name, group_specs, dtype=dtype, device=device, ctor=ctor, seed=seed,
                                    ref_dtype=torch.float32)
    gen = make_gen(seed + 1)
    for t in range(1, steps + 1):
        resync_oracle(ref, fo)
        before = half_snapshot(fo)
        for i in before:  # upcast "before" values for the tolerance formula
            before[i] = {k: (v.to(torch.float32) if torch.is_tensor(v) else v) for k, v in before[i].items()}
        grads = feed_same_grads(ref, fo, gen, dtype=dtype, kind="half")
        ref.step()
        fo.step()
        assert_grads_untouched(fo, grads, f"{name} step {t}")
        assert_half_pair_step(ref, fo, before, dtype, f"{name} {dtype} {device} step {t}")
    return ref, fo



# --------------------------------------------------------------------------------------------
# recording the fused op calls
# --------------------------------------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402


class RecordFusedOps(TorchDispatchMode):
    """Records every call into the ``fusedopt`` op namespace with cloned (pre-call) arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedopt":
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls.append((func, tree_map(clone, args), tree_map(clone, kwargs)))
        return func(*args, **kwargs)


def op_device(args, kwargs):
    """The device an op call runs on: its params' (CPU-hosted scalars such as the hyper table and
    step counters do not decide it)."""
    flat, _ = tree_flatten((args, kwargs))
    devs = {t.device for t in flat if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
    return devs.pop() if len(devs) == 1 else torch.device("cpu")
