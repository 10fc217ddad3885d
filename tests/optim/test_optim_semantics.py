"""(3) Step semantics shared with torch.optim: params without grad (and grads appearing /
disappearing later), sparse grads, complex params, non-contiguous params / grads, closure,
zero_grad, gradient accumulation, step hooks, add_param_group, and edits users make between steps
that torch picks up because it re-reads params / grads / state every step (p.data replaced, state
cleared or edited, param lists edited, grads reused in place).  float64 throughout, so parity is
checked at 1e-12."""

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    Side,
    assert_close_dtype,
    assert_pair_close,
    build_pair,
    feed_same_grads,
    fused_cls,
    leaf,
    make_gen,
    run_parity,
    run_with_edits,
    state_of,
    torch_cls,
)

DT = torch.float64
NAMES = ["SGD", "Adam", "AdamW"]
CTORS = {
    "SGD": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}
CLEAN_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)


# ------------------------------------------------------------------------------- missing grads
def _has_grad_p1(t):
    """Param 1's grad: absent for steps 1-4, present 5-7, absent again 8-9, present 10-12."""
    return 5 <= t <= 7 or t >= 10


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_skipped_and_get_state_when_grad_appears(name, device):
    """Param 1 has no grad on some steps: while it has never had one, no state and untouched
    (bitwise); once it has state, steps without a grad leave param and state bitwise unchanged
    (step counter included).  Param 2 always gets an all-zero grad: that is NOT skipped (weight
    decay / momentum still act), like torch."""
    ref, fo = build_pair(name, [([(4,), (5, 3), (6,)], {})], dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(3)
    tr = MagnitudeTracker()
    for t in range(1, 13):
        feed_same_grads(ref, fo, gen, dtype=DT, mask=[True, _has_grad_p1(t), True])
        for side in (ref, fo):
            side.params[2].grad.zero_()
        p1_before = fo.params[1].detach().clone()
        st1_before = {k: torch.as_tensor(v).detach().clone() for k, v in state_of(fo.opt, fo.params[1]).items()}
        ref.step()
        fo.step()
        tr.update(ref)
        if not _has_grad_p1(t):
            assert torch.equal(fo.params[1].detach(), p1_before), f"step {t}: a param without grad was modified"
            st1 = state_of(fo.opt, fo.params[1])
            if t <= 4:
                assert len(st1) == 0, "state was created for a param that never had a grad"
            else:
                assert set(st1) == set(st1_before)
                for k, v in st1.items():
                    assert torch.equal(torch.as_tensor(v), st1_before[k]), f"step {t}: state[{k!r}] of a param without grad changed"
        assert_pair_close(ref, fo, DT, f"step {t}", tracker=tr)
    st = state_of(fo.opt, fo.params[1])
    if "step" in st:
        assert float(st["step"]) == 6 and float(state_of(fo.opt, fo.params[0])["step"]) == 12


@pytest.mark.parametrize("name", NAMES)
def test_whole_group_without_grads(name, device):
    """A param group where no param has a grad yet (frozen layer): other groups still step."""
    run_parity(
        name,
        [([(3,), (4,)], {}), ([(5,)], {"lr": 0.03})],
        dtype=DT,
        device=device,
        steps=8,
        ctor=CTORS[name],
        grad_mask_fn=lambda t, n: [t > 5, t > 5, True],
        check_every=1,
    )


# ------------------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("name", NAMES)
def test_sparse_grad(name, device):
    """torch.optim.Adam/AdamW raise RuntimeError mentioning sparse gradients; fusedopt must raise a
    RuntimeError naming the problem ("sparse") before touching any param.  torch's for-loop SGD
    does support sparse grads: for SGD, fusedopt may either raise that error or match torch."""
    ctor = dict(CTORS[name])
    if name == "SGD":
        ctor = dict(lr=0.1, momentum=0.9)  # torch: weight_decay is not supported with sparse grads anyway
    ref, fo = build_pair(name, [([(10, 3), (4,)], {})], dtype=DT, device=device, ctor=ctor)
    gen = make_gen(5)
    for side in (ref, fo):
        g = torch.zeros(10, 3, dtype=DT)
        g[[1, 7]] = torch.randn(2, 3, generator=make_gen(7), dtype=DT)
        side.params[0].grad = g.to_sparse().to(device)
        side.params[1].grad = torch.randn(4, generator=make_gen(8), dtype=DT).to(device)
    before = [p.detach().clone() for p in fo.params]
    try:
        fo.step()
    except RuntimeError as e:
        assert "sparse" in str(e).lower(), f"error does not name the problem: {e}"
        for p, b in zip(fo.params, before):
            assert torch.equal(p.detach(), b), "params modified by a step that raised"
        if name != "SGD":
            with pytest.raises(RuntimeError, match="sparse"):
                ref.step()
        return
    assert name == "SGD", f"{name} accepted a sparse grad; torch.optim.{name} raises RuntimeError"
    ref.step()
    for pr, pf in zip(ref.params, fo.params):
        assert_close_dtype(pf, pr, DT, "SGD sparse grad step")


# ------------------------------------------------------------------------------------ complex
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_complex_params_work_or_raise_cleanly(name, dtype, device):
    """torch.optim supports complex params (Adam via view_as_real).  fusedopt must either match
    torch or refuse with a clear error (RuntimeError/ValueError/TypeError/NotImplementedError whose
    message says 'complex'), raised before any param is modified."""
    specs = [([(3,), (4, 5)], {}), ([(7,)], {"lr": 0.02})]
    try:
        ref, fo = build_pair(name, specs, dtype=dtype, device=device, ctor=CTORS[name])
    except CLEAN_ERRORS as e:
        assert "complex" in str(e).lower(), f"unclear error for complex params: {type(e).__name__}: {e}"
        return
    gen = make_gen(2)
    tr = MagnitudeTracker()
    for t in range(1, 21):
        feed_same_grads(ref, fo, gen, dtype=dtype)
        before = [p.detach().clone() for p in fo.params]
        ref.step()
        try:
            fo.step()
        except CLEAN_ERRORS as e:
            assert t == 1, f"complex params failed only at step {t}: {e}"
            assert "complex" in str(e).lower(), f"unclear error for complex params: {type(e).__name__}: {e}"
            for p, b in zip(fo.params, before):
                assert torch.equal(p.detach(), b), "params modified by a step that raised"
            return
        tr.update(ref)
    assert_pair_close(ref, fo, dtype, f"{name} {dtype}", tracker=tr)


# ------------------------------------------------------------------------------ memory layouts
def _layout_params(kind, device):
    """(param, grad) pairs with unusual layouts, param values identical for both optimizers."""
    g = make_gen(4)
    if kind == "transposed":  # dense but not contiguous
        p = torch.randn(6, 5, generator=g, dtype=DT).t()
    elif kind == "strided_view":  # non-dense view: every other column of a bigger buffer
        p = torch.randn(5, 12, generator=g, dtype=DT)[:, ::2]
    elif kind == "channels_last":  # conv weight in channels_last, as used by CNNs
        p = torch.randn(4, 3, 3, 3, generator=g, dtype=DT).to(memory_format=torch.channels_last)
    elif kind == "expanded_grad":  # contiguous param, grad with zero strides (from expand)
        p = torch.randn(4, 6, generator=g, dtype=DT)
    elif kind == "transposed_grad":  # contiguous param, grad with transposed strides
        p = torch.randn(4, 6, generator=g, dtype=DT)
    else:
        raise ValueError(kind)
    return p.to(device)


def _layout_grad(kind, p, gen):
    if kind == "expanded_grad":
        return torch.randn(1, p.shape[1], generator=gen, dtype=DT).to(p.device).expand(p.shape)
    if kind == "transposed_grad":
        return torch.randn(p.shape[1], p.shape[0], generator=gen, dtype=DT).to(p.device).t()
    g = torch.randn(p.shape, generator=gen, dtype=DT).to(p.device)
    return torch.empty_like(p).copy_(g) if kind in ("transposed", "channels_last") else g


def _as_leaf_view(p, kind):
    """A leaf with exactly p's values and strides (a view into a bigger buffer for strided_view)."""
    if kind == "strided_view":
        big = torch.zeros(p.shape[0], p.shape[1] * 2, dtype=p.dtype, device=p.device)
        out = big[:, ::2]
    else:
        out = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device)
    out.copy_(p)
    return out.requires_grad_(True)


@pytest.mark.parametrize("kind", ["transposed", "strided_view", "channels_last", "expanded_grad", "transposed_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_unusual_layouts_handled_or_rejected_cleanly(name, kind, device):
    """Non-contiguous params / grads: either exact torch parity (params keep their strides) or a
    clear error (message mentions contiguity/layout/strides) before anything is modified."""
    base = _layout_params(kind, device)
    pr, pf = _as_leaf_view(base, kind), _as_leaf_view(base, kind)
    assert pf.stride() == base.stride()
    extra_r, extra_f = leaf(torch.arange(5.0, dtype=DT), DT, device), leaf(torch.arange(5.0, dtype=DT), DT, device)
    ref = Side(torch_cls(name)([pr, extra_r], foreach=False, **CTORS[name]), [pr, extra_r])
    fo = Side(fused_cls(name)([pf, extra_f], **CTORS[name]), [pf, extra_f])
    gen = make_gen(6)
    tr = MagnitudeTracker()
    for t in range(1, 13):
        g = _layout_grad(kind, pf, gen)
        ge = torch.randn(5, generator=gen, dtype=DT).to(device)
        pr.grad, pf.grad = g.clone(), g  # the oracle's layout does not matter, fusedopt gets the odd one
        extra_r.grad, extra_f.grad = ge.clone(), ge.clone()
        before = [p.detach().clone() for p in fo.params]
        ref.step()
        try:
            fo.step()
        except CLEAN_ERRORS as e:
            msg = str(e).lower()
            assert t == 1, f"{kind} failed only at step {t}: {e}"
            assert any(w in msg for w in ("contiguous", "dense", "stride", "layout", "overlap")), (
                f"unclear error for {kind}: {type(e).__name__}: {e}"
            )
            for p, b in zip(fo.params, before):
                assert torch.equal(p.detach(), b), "params modified by a step that raised"
            return
        tr.update(ref)
        assert pf.stride() == base.stride(), "the param's strides changed (it must be updated in place)"
    assert_pair_close(ref, fo, DT, f"{name} {kind}", tracker=tr)
    for k, v in state_of(ref.opt, pr).items():
        if k != "step" and kind in ("transposed", "channels_last"):
            # torch allocates state with zeros_like(p, memory_format=torch.preserve_format)
            assert state_of(fo.opt, pf)[k].stride() == v.stride(), f"state[{k!r}] layout differs from torch's"


def test_param_storage_is_updated_in_place(device):
    """Params are updated in place: views/aliases of a param (e.g. tied weights, a module holding
    the same tensor) see the update and the param's data_ptr does not change."""
    for name in NAMES:
        p = leaf(torch.randn(8, dtype=DT), DT, device)
        alias = p.detach()  # shares storage
        ptr = p.data_ptr()
        opt = fused_cls(name)([p], **CTORS[name])
        p.grad = torch.ones_like(p)
        opt.step()
        assert p.data_ptr() == ptr, f"{name}: param storage was replaced"
        assert torch.equal(alias, p.detach()), f"{name}: update not visible through an alias"


# ------------------------------------------------------------------------------------ closure
def _model_loss(params, x):
    w, b = params
    return ((torch.tanh(x @ w) + b) ** 2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_once_and_its_loss_returned(name, device):
    x = torch.randn(6, 4, generator=make_gen(1), dtype=DT).to(device)
    ref, fo = build_pair(name, [([(4, 3), (3,)], {})], dtype=DT, device=device, ctor=CTORS[name])
    tr = MagnitudeTracker()
    for t in range(10):
        losses = {}
        calls = {"ref": 0, "fo": 0}

        def make_closure(side, key):
            def closure():
                calls[key] += 1
                side.opt.zero_grad()
                loss = _model_loss(side.params, x)
                loss.backward()
                losses[key] = loss
                return loss

            return closure

        out_r = ref.opt.step(make_closure(ref, "ref"))
        out_f = fo.opt.step(make_closure(fo, "fo"))
        tr.update(ref)
        assert calls["fo"] == calls["ref"] == 1
        assert out_f is losses["fo"], "step(closure) must return the closure's loss object"
        assert out_r is losses["ref"]
        assert_close_dtype(out_f, out_r, DT, f"loss at step {t}")
    assert_pair_close(ref, fo, DT, "closure training", tracker=tr)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_returns_none(name, device):
    p = leaf(torch.randn(3, dtype=DT), DT, device)
    opt = fused_cls(name)([p], **CTORS[name])
    p.grad = torch.ones_like(p)
    assert opt.step() is None


# ---------------------------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name, device):
    ps = [leaf(torch.randn(s, dtype=DT), DT, device) for s in [(3,), (2, 2), (5,)]]
    opt = fused_cls(name)([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], **CTORS[name])
    for p in ps[:2]:
        p.grad = torch.randn_like(p)
    objs = [p.grad for p in ps[:2]]
    opt.zero_grad(set_to_none=False)
    for p, o in zip(ps[:2], objs):
        assert p.grad is o, "zero_grad(set_to_none=False) must zero the existing grad tensor in place"
        assert torch.count_nonzero(p.grad) == 0 and not p.grad.requires_grad
    assert ps[2].grad is None, "zero_grad must not create grads"
    opt.zero_grad()  # default: set_to_none=True
    assert all(p.grad is None for p in ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ps)


# --------------------------------------------------------------------------- grad accumulation
@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_matches_torch(name, device):
    """Two backward passes (grads accumulate into .grad), then one step, then zero_grad."""
    gen = make_gen(21)
    ref, fo = build_pair(name, [([(4, 3), (3,)], {}), ([(3,)], {"lr": 0.003})], dtype=DT, device=device, ctor=CTORS[name])
    tr = MagnitudeTracker()
    for t in range(8):
        xs = [torch.randn(5, 4, generator=gen, dtype=DT).to(device) for _ in range(2)]
        for side in (ref, fo):
            w, b, c = side.params
            for x in xs:
                (((torch.tanh(x @ w) + b) * c) ** 2).mean().backward()
        ref.step()
        fo.step()
        tr.update(ref)
        ref.opt.zero_grad()
        fo.opt.zero_grad()
    assert_pair_close(ref, fo, DT, "gradient accumulation", tracker=tr)


# ----------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run(name, device):
    """Optimizer step pre/post hooks (part of the torch.optim.Optimizer API) are honoured."""
    p = leaf(torch.randn(3, dtype=DT), DT, device)
    opt = fused_cls(name)([p], **CTORS[name])
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", torch.equal(p.detach(), before))))
    h2 = opt.register_step_post_hook(lambda o, a, k: seen.append(("post", torch.equal(p.detach(), before))))
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    assert seen == [("pre", True), ("post", False)]
    h1.remove()
    h2.remove()


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_later(name, device):
    """add_param_group after some steps: the new group inherits defaults and steps like torch."""
    ref, fo = build_pair(name, [([(4,)], {})], dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(8)
    tr = MagnitudeTracker()
    for t in range(12):
        if t == 5:
            new = torch.randn(6, generator=make_gen(99), dtype=DT)
            pr, pf = leaf(new, DT, device), leaf(new, DT, device)
            ref.opt.add_param_group({"params": [pr], "lr": 0.02})
            fo.opt.add_param_group({"params": [pf], "lr": 0.02})
            ref.params.append(pr)
            fo.params.append(pf)
            assert set(fo.opt.param_groups[1]) == set(ref.opt.param_groups[1])
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
        tr.update(ref)
    assert_pair_close(ref, fo, DT, "add_param_group", tracker=tr)


# ------------------------------------------------------------ things a cached "plan" could miss
@pytest.mark.parametrize("name", NAMES)
def test_param_data_replaced_mid_run(name, device):
    """``p.data = new_tensor`` (done by some model-surgery / weight-loading code) after steps: the
    next step must update the new storage, like torch (which looks at the params every step)."""
    ref, fo = build_pair(name, [([(4,), (3, 5)], {})], dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(12)
    tr = MagnitudeTracker()
    for t in range(8):
        if t == 4:
            new = [torch.randn(p.shape, generator=make_gen(50 + i), dtype=DT).to(device) for i, p in enumerate(fo.params)]
            for side in (ref, fo):
                for p, v in zip(side.params, new):
                    p.data = v.clone()
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
        tr.update(ref)
        assert_pair_close(ref, fo, DT, f"step {t} (p.data replaced before step 4)", tracker=tr)


def _edit_state(side, t):
    if t == 4:  # 'reset the optimizer' idioms: torch re-initialises the state lazily
        side.opt.state[side.params[1]].clear()
    if t == 8:
        side.opt.state.clear()
    if t == 14:
        for p in side.params:
            st = side.opt.state[p]
            if "step" in st:
                st["step"] = torch.tensor(100.0)  # replaced by a new tensor object
            for k in ("exp_avg", "momentum_buffer"):
                if k in st:
                    st[k].mul_(0.5)  # edited in place
    if t == 16:
        st = side.opt.state[side.params[0]]
        for k in ("exp_avg_sq", "momentum_buffer"):
            if k in st:
                st[k] = st[k].clone() * 2  # replaced by a new tensor


@pytest.mark.parametrize("what", ["cleared", "edited"])
@pytest.mark.parametrize("name", NAMES)
def test_state_cleared_or_edited_mid_run(name, what, device):
    """Clearing a param's state / the whole state re-initialises it lazily (cleared: before steps
    4 and 8); replacing or editing state tensors by hand is honoured at the next step (edited:
    before steps 14 and 16)."""
    def edit(t, side):
        if (what == "cleared") == (t < 12):
            _edit_state(side, t)

    run_with_edits(name, [([(4,), (3, 5)], {})], dtype=DT, device=device, ctor=CTORS[name], seed=13,
                   steps=18, edit=edit, what=f"state {what}")


@pytest.mark.parametrize("name", NAMES)
def test_param_list_edited_in_place(name, device):
    """Params appended to / removed from ``group['params']`` directly (not via add_param_group)
    are stepped / no longer stepped, like torch, which iterates the lists every step."""
    ref, fo = build_pair(name, [([(4,), (3, 5)], {}), ([(6,)], {"lr": 0.02})], dtype=DT, device=device, ctor=CTORS[name])
    extra = torch.randn(7, generator=make_gen(70), dtype=DT)
    xr, xf = leaf(extra, DT, device), leaf(extra, DT, device)
    gen = make_gen(14)
    tr = MagnitudeTracker()
    for t in range(10):
        if t == 3:
            ref.opt.param_groups[1]["params"].append(xr)
            fo.opt.param_groups[1]["params"].append(xf)
            ref.params.append(xr)
            fo.params.append(xf)
        if t == 6:  # drop param 0 from group 0: it must stay frozen from now on
            ref.opt.param_groups[0]["params"].pop(0)
            fo.opt.param_groups[0]["params"].pop(0)
            frozen = fo.params[0].detach().clone()
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
        tr.update(ref)
        assert_pair_close(ref, fo, DT, f"step {t} (param lists edited before steps 3 and 6)", tracker=tr)
        if t >= 6:
            assert torch.equal(fo.params[0].detach(), frozen), "a param removed from its group was still updated"


@pytest.mark.parametrize("name", NAMES)
def test_grads_reused_in_place_with_zero_grad_set_to_none_false(name, device):
    """Training loop with zero_grad(set_to_none=False): the same grad tensors are zeroed and
    re-filled by backward every step."""
    gen = make_gen(22)
    ref, fo = build_pair(name, [([(4, 3), (3,)], {})], dtype=DT, device=device, ctor=CTORS[name])
    tr = MagnitudeTracker()
    for t in range(8):
        x = torch.randn(5, 4, generator=gen, dtype=DT).to(device)
        for side in (ref, fo):
            side.opt.zero_grad(set_to_none=False)
            w, b = side.params
            ((torch.tanh(x @ w) + b) ** 2).mean().backward()
        ref.step()
        fo.step()
        tr.update(ref)
    assert_pair_close(ref, fo, DT, "zero_grad(set_to_none=False) loop", tracker=tr)


def test_sgd_refuses_to_capture_the_step_that_creates_momentum_buffers(monkeypatch):
    """Captured, the step that starts momentum buffers would restart them on every replay (momentum
    silently off): fusedopt.SGD raises instead. (tests/cuda runs the real capture on a GPU.)"""
    from fusedopt.optim import sgd as sgd_module

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="creates momentum buffers.*take one eager optimizer step"):
        sgd_module._refuse_capture_of_fresh_buffers(torch.device("cuda", 0))
    sgd_module._refuse_capture_of_fresh_buffers(torch.device("cpu"))  # CPU steps are never captured
