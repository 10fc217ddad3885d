"""Independent, adversarial tests of fusedopt's per-step plan and flat storage, with torch.optim as
the oracle (fusedopt's flat vs unflattened runs: bit-identical).

Every test makes the same moves on a torch.optim optimizer and on a fusedopt one (plus, for flat
storage, a fusedopt one on unflattened params) and compares params and state after every step.
"""

from __future__ import annotations

import copy
import math

import re

import pytest
import torch
from torch import nn

import fusedopt
from torch_oracle import has_oracle_for_missing_state, require_oracle_for_missing_state

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")

TOL = dict(rtol=1e-5, atol=1e-6)

PAIRS = {
    "SGD": (fusedopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "Adam": (fusedopt.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    "AdamW": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "RMSprop": (fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    "Adagrad": (fusedopt.Adagrad, torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
}
NAMES = list(PAIRS)
STATE_KEY = {"SGD": "momentum_buffer", "Adam": "exp_avg", "AdamW": "exp_avg_sq", "RMSprop": "square_avg",
             "Adagrad": "sum"}
SHAPES = [(7, 5), (13,), (3, 4, 2), (31,)]


# --------------------------------------------------------------------------------------------------
# helpers


class Side:
    def __init__(self, params, opt, tag):
        self.p, self.opt, self.tag = params, opt, tag


def make_params(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def make_grads(steps, shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def twin(name, shapes=SHAPES, seed=0, groups=None, dtype=torch.float32, **over):
    """(torch side, fusedopt side) over identical param clones. ``groups(params)`` builds the
    param groups from the list."""
    fcls, tcls, kw = PAIRS[name]
    kw = {**kw, **over}
    base = make_params(shapes, seed, dtype)
    sides = []
    for cls, tag in ((tcls, "torch"), (fcls, "fused")):
        ps = [b.clone().requires_grad_() for b in base]
        own = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}  # no shared tensor lr
        opt = cls(groups(ps) if groups else ps, **own)
        sides.append(Side(ps, opt, tag))
    return sides


def set_grads(side, grads):
    for p, g in zip(side.p, grads):
        p.grad = None if g is None else g.clone()


def assert_state_close(topt, fopt, tparams, fparams, what, exact=False, **tol):
    tol = tol or TOL
    for i, (tp, fp) in enumerate(zip(tparams, fparams)):
        st, sf = topt.state.get(tp, {}), fopt.state.get(fp, {})
        assert set(st) <= set(sf), f"{what}: state keys of param {i}: torch {sorted(st)} fused {sorted(sf)}"
        for k, v in st.items():
            if torch.is_tensor(v):
                w = sf[k]
                assert torch.is_tensor(w), f"{what}: state {k} of param {i} is not a tensor"
                if exact:
                    assert torch.equal(v, w), f"{what}: state {k} of param {i} differs"
                else:
                    up = (lambda t: t) if v.is_complex() else (lambda t: t.float())
                    torch.testing.assert_close(up(w), up(v), **tol,
                                               msg=lambda m: f"{what}: state {k} of param {i}: {m}")


def assert_sides(T, F, what, **tol):
    tol = tol or TOL
    for i, (a, b) in enumerate(zip(T.p, F.p)):
        torch.testing.assert_close(b.detach(), a.detach(), **tol, msg=lambda m: f"{what}: param {i}: {m}")
    assert_state_close(T.opt, F.opt, T.p, F.p, what, **tol)


def snapshot(opt, p):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()}


# --------------------------------------------------------------------------------------------------
# The plan, plain (unflattened) params


@pytest.mark.parametrize("name", NAMES)
def test_lost_grads_skip_param_and_keep_state_bitwise(name):
    """p.grad = None for some params in some steps (different params each step): skipped exactly,
    param and state bit-unchanged; others match torch."""
    T, F = twin(name)
    G = make_grads(6, SHAPES, 1)
    lost = {1: [1], 2: [1, 3], 3: [0], 4: [], 5: [0, 1, 2, 3]}
    for k in range(6):
        before = [(p.detach().clone(), snapshot(F.opt, p)) for p in F.p]
        for S in (T, F):
            set_grads(S, G[k])
            for i in lost.get(k, []):
                S.p[i].grad = None
            S.opt.step()
        for i in lost.get(k, []):
            assert torch.equal(F.p[i], before[i][0]), f"step {k}: param {i} without grad changed"
            after = snapshot(F.opt, F.p[i])
            assert after.keys() == before[i][1].keys()
            for key, v in before[i][1].items():
                if torch.is_tensor(v):
                    assert torch.equal(after[key], v), f"step {k}: state {key} of gradless param {i} changed"
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_param_first_gets_grad_late(name):
    """A param without grad for the first steps (no state) that gets one later: state is created
    then, as in torch (step counts differ per param)."""
    T, F = twin(name)
    G = make_grads(5, SHAPES, 2)
    for k in range(5):
        for S in (T, F):
            set_grads(S, G[k])
            if k < 3:
                S.p[2].grad = None
            S.opt.step()
        if k < 3:
            assert len(F.opt.state.get(F.p[2], {})) == len(T.opt.state.get(T.p[2], {}))
        assert_sides(T, F, f"step {k}")


def _fresh_error(name, F, bad_index, bad_grad, grads):
    """The error a fresh fusedopt optimizer raises on the same params/grads (with the same state)."""
    fcls, _, kw = PAIRS[name]
    ps = [p.detach().clone().requires_grad_() for p in F.p]
    opt = fcls(ps, **kw)
    opt.load_state_dict(copy.deepcopy(F.opt.state_dict()))
    for i, (p, g) in enumerate(zip(ps, grads)):
        if i == bad_index:
            if bad_grad[0] == "data":
                p.grad = g.clone()
                p.grad.data = bad_grad[1]()
            else:
                p.grad_dtype = None
                p.grad = bad_grad[1]()
        else:
            p.grad = g.clone()
    with pytest.raises(Exception) as e:
        opt.step()
    return str(e.value)


MISFITS = ["transposed", "bigger", "float64", "strided-slice"]


def _misfit(kind, shape):
    """(how, factory): factory() makes a fresh misfit grad each call (clone() would make it
    contiguous again)."""
    n = math.prod(shape)
    if kind == "transposed":
        return ("set", lambda: torch.ones(tuple(reversed(shape))).t())
    if kind == "bigger":
        return ("data", lambda: torch.ones(n + 3))
    if kind == "float64":
        return ("set", lambda: torch.ones(shape, dtype=torch.float64))
    if kind == "strided-slice":
        return ("set", lambda: torch.ones(2 * n)[::2].view(shape))


@pytest.mark.parametrize("kind", MISFITS)
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Adam"])
def test_misfit_grad_on_last_param_raises_fresh_error_and_changes_nothing(name, kind):
    """After several plan steps, the LAST param's grad becomes a misfit: same error as a fresh step,
    no param / state changes anywhere; putting good grads back continues like torch."""
    shapes = [(7, 5), (13,), (5, 3)] if kind == "transposed" else [(7, 5), (6,), (13,)]
    T, F = twin(name, shapes=shapes)
    G = make_grads(5, shapes, 3)
    for k in range(3):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
    bad = _misfit(kind, shapes[-1])
    expected = _fresh_error(name, F, len(shapes) - 1, bad, G[3])
    before = [p.detach().clone() for p in F.p]
    states = [snapshot(F.opt, p) for p in F.p]
    set_grads(F, G[3])
    if bad[0] == "data":
        F.p[-1].grad.data = bad[1]()
    else:
        F.p[-1].grad_dtype = None
        F.p[-1].grad = bad[1]()
    with pytest.raises(Exception) as e:
        F.opt.step()
    assert str(e.value) == expected
    for i, p in enumerate(F.p):
        assert torch.equal(p, before[i]), f"param {i} changed by a failed step"
        for key, v in states[i].items():
            if torch.is_tensor(v):
                assert torch.equal(F.opt.state[p][key], v), f"state {key} of param {i} changed by a failed step"
    F.p[-1].grad = None
    F.p[-1].grad_dtype = F.p[-1].dtype
    for k in (3, 4):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
    assert_sides(T, F, "after misfit")


@pytest.mark.parametrize("name", NAMES)
def test_grad_object_kept_but_storage_swapped(name):
    """p.grad.data = other tensor (same shape), p.grad.set_(...) and grads that are views at moving
    offsets of one shared buffer: the step reads the grads' new memory, like torch."""
    T, F = twin(name)
    G = make_grads(6, SHAPES, 4)
    bufs = {S.tag: torch.zeros(4096) for S in (T, F)}
    for k in range(6):
        for S in (T, F):
            if k == 0:
                set_grads(S, G[k])
            elif k == 1:
                for p, g in zip(S.p, G[k]):
                    p.grad.data = g.clone()
            elif k == 2:
                with torch.no_grad():
                    for p, g in zip(S.p, G[k]):
                        p.grad.set_(g.clone())
            else:  # views of one buffer, offset moved each step
                buf, off = bufs[S.tag], 100 * k
                for p, g in zip(S.p, G[k]):
                    n = g.numel()
                    buf[off:off + n].copy_(g.reshape(-1))
                    p.grad = buf[off:off + n].view(g.shape)
                    off += n + 1
            S.opt.step()
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_grad_zeroed_in_place_and_accumulated(name):
    """zero_grad(set_to_none=False), then grads accumulated in place twice per step (same grad
    objects throughout)."""
    T, F = twin(name)
    G = make_grads(8, SHAPES, 5)
    for S in (T, F):
        set_grads(S, G[0])
    for k in range(4):
        for S in (T, F):
            S.opt.zero_grad(set_to_none=False)
            for p, g1, g2 in zip(S.p, G[2 * k], G[2 * k + 1]):
                p.grad.add_(g1)
                p.grad.add_(g2)
            S.opt.step()
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("how", ["setitem-new", "copy_", "data", "set_-same-storage-offset", "data-same-storage-offset",
                                 "mul_"])
@pytest.mark.parametrize("name", NAMES)
def test_state_tensor_edits(name, how):
    """Edits of a state tensor between steps, including moving it to another offset of the SAME
    storage (a storage-identity check would miss that)."""
    key = STATE_KEY[name]
    T, F = twin(name)
    G = make_grads(5, SHAPES, 6)
    idx = 3  # a (31,) param
    holders = {}
    for k in range(5):
        for S in (T, F):
            set_grads(S, G[k])
            if k in (2, 3):
                p = S.p[idx]
                t = S.opt.state[p][key]
                new = t.detach().clone() * 0.5 + 0.1
                if how == "setitem-new":
                    S.opt.state[p][key] = new
                elif how == "copy_":
                    t.copy_(new)
                elif how == "data":
                    t.data = new
                elif how == "mul_":
                    t.mul_(0.5)
                else:
                    n = t.numel()
                    if k == 2:  # first move into a big buffer
                        big = torch.zeros(4 * n)
                        holders[S.tag] = big
                        big[:n].copy_(new)
                        t.data = big[:n]
                    else:  # then to another offset of the same storage
                        big = holders[S.tag]
                        big[2 * n:3 * n].copy_(new)
                        big[:n].fill_(1e3)
                        if how == "data-same-storage-offset":
                            t.data = big[2 * n:3 * n]
                        else:
                            with torch.no_grad():
                                t.set_(big.untyped_storage(), 2 * n, (n,), (1,))
            S.opt.step()
        assert_sides(T, F, f"step {k} ({how})")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("how", ["fill_", "iadd", "replace"])
def test_step_counter_edits(name, how):
    """Edits of state['step'] (bias correction / lr_decay depend on it)."""
    T, F = twin(name)
    G = make_grads(5, SHAPES, 7)
    for k in range(5):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 2:
                for p in S.p[:2]:
                    st = S.opt.state[p]
                    if how == "fill_":
                        st["step"].fill_(10.0)
                    elif how == "iadd":
                        st["step"] += 5
                    else:
                        st["step"] = torch.tensor(20.0)
            S.opt.step()
        assert_sides(T, F, f"step {k} ({how})")


@pytest.mark.parametrize("how", ["del-state", "empty-plain-dict", "clear"])
@pytest.mark.parametrize("name", NAMES)
def test_state_reset_reinitialises_like_torch(name, how):
    require_oracle_for_missing_state(name)
    T, F = twin(name)
    G = make_grads(5, SHAPES, 8)
    for k in range(5):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 2:
                p = S.p[1]
                if how == "del-state":
                    del S.opt.state[p]
                elif how == "empty-plain-dict":
                    S.opt.state[p] = {}
                else:
                    S.opt.state[p].clear()
            S.opt.step()
        assert_sides(T, F, f"step {k} ({how})")


def test_sgd_momentum_buffer_set_to_none_reinitialises():
    T, F = twin("SGD")
    G = make_grads(4, SHAPES, 9)
    for k in range(4):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 2:
                S.opt.state[S.p[0]]["momentum_buffer"] = None
            S.opt.step()
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("source", ["torch", "fused-rollback", "torch-rollback"])
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_mid_run(name, source):
    """load_state_dict after plan steps: from the torch optimizer's current state, or a rollback to
    an earlier checkpoint (own, or torch's) with a changed lr in the saved groups."""
    T, F = twin(name)
    G = make_grads(7, SHAPES, 10)
    saved = {}
    for k in range(7):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
        if k == 1:
            saved = {S.tag: copy.deepcopy(S.opt.state_dict()) for S in (T, F)}
            for sd in saved.values():
                sd["param_groups"][0]["lr"] *= 0.5
        if k == 3:
            if source == "torch":
                F.opt.load_state_dict(copy.deepcopy(T.opt.state_dict()))
            else:
                T.opt.load_state_dict(copy.deepcopy(saved["torch"]))
                F.opt.load_state_dict(copy.deepcopy(saved["fused" if source == "fused-rollback" else "torch"]))
        assert_sides(T, F, f"step {k}")
    # and back into torch
    T2 = torch.optim.__dict__[type(T.opt).__name__](T.p, **PAIRS[name][2])
    T2.load_state_dict(F.opt.state_dict())
    assert_state_close(T.opt, T2, T.p, T.p, "fused state_dict loaded into torch")


HYPER_EDITS = {
    "SGD": [dict(lr=0.2), dict(momentum=0.5, dampening=0.3), dict(weight_decay=0.0), dict(nesterov=True, dampening=0.0),
            dict(maximize=True)],
    "Adam": [dict(lr=0.002), dict(betas=(0.5, 0.9)), dict(weight_decay=0.3), dict(eps=1e-2), dict(maximize=True)],
    "AdamW": [dict(lr=0.002), dict(betas=(0.8, 0.99)), dict(weight_decay=0.0), dict(eps=1e-1), dict(maximize=True)],
    "RMSprop": [dict(lr=0.1), dict(alpha=0.5), dict(weight_decay=0.2), dict(momentum=0.9, eps=1e-3),
                dict(maximize=True)],
    "Adagrad": [dict(lr=0.2), dict(lr_decay=0.5), dict(weight_decay=0.1), dict(eps=1e-1), dict(maximize=True)],
}


@pytest.mark.parametrize("name", NAMES)
def test_param_group_hyperparameter_edits_every_step(name):
    """Each step edits another hyperparameter of the second group only."""
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]  # noqa: E731
    T, F = twin(name, groups=groups)
    edits = HYPER_EDITS[name]
    G = make_grads(len(edits) + 2, SHAPES, 11)
    for k in range(len(edits) + 2):
        for S in (T, F):
            set_grads(S, G[k])
            if 1 <= k <= len(edits):
                S.opt.param_groups[1].update(edits[k - 1])
            S.opt.step()
        assert_sides(T, F, f"step {k} after {edits[k - 1] if 1 <= k <= len(edits) else None}")


@pytest.mark.parametrize("name", NAMES)
def test_group_structure_edits(name):
    """add_param_group after steps, a param popped from a list, one appended to a list directly,
    two same-shaped params swapped in a list, a param moved between groups, a group deleted, the
    whole 'params' list replaced by a new list."""
    require_oracle_for_missing_state(name)
    shapes = [(6, 4), (6, 4), (9,), (9,), (5,), (24,)]
    base = make_params(shapes, 12)
    fcls, tcls, kw = PAIRS[name]
    sides = []
    for cls, tag in ((tcls, "torch"), (fcls, "fused")):
        ps = [b.clone().requires_grad_() for b in base]
        sides.append(Side(ps, cls([{"params": ps[:4]}, {"params": [ps[4]], "lr": 0.02}], **kw), tag))
    T, F = sides
    G = make_grads(9, shapes, 13)
    for k in range(9):
        for S in (T, F):
            set_grads(S, G[k])
            pg = S.opt.param_groups
            if k == 1:
                S.opt.add_param_group({"params": [S.p[5]], "lr": 0.003})
            elif k == 2:
                pg[0]["params"].pop(2)  # ps[2] no longer stepped
            elif k == 3:
                pg[1]["params"].append(S.p[2])  # back, in another group
            elif k == 4:
                l0 = pg[0]["params"]
                l0[0], l0[1] = l0[1], l0[0]
            elif k == 5:
                pg[0]["params"] = list(reversed(pg[0]["params"]))
            elif k == 6:
                del pg[2]
            elif k == 7:
                moved = pg[0]["params"].pop()
                pg[1]["params"].insert(0, moved)
            S.opt.step()
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("how", ["new-tensor", "view-of-bigger", "same-storage-new-offset", "set_", "inplace"])
@pytest.mark.parametrize("name", NAMES)
def test_param_data_replaced_or_edited(name, how):
    """p.data = ... (a new tensor, a view into a bigger buffer, another offset of the SAME storage),
    p.set_(...) under no_grad, and in-place edits: the next step updates what p now is."""
    T, F = twin(name)
    G = make_grads(6, SHAPES, 14)
    holders = {}
    for k in range(6):
        for S in (T, F):
            set_grads(S, G[k])
            if k in (2, 4):
                p = S.p[0]
                n = p.numel()
                vals = p.detach().clone() * 0.9 + 0.01
                if how == "new-tensor":
                    p.data = vals
                elif how == "view-of-bigger":
                    big = torch.zeros(3 * n + 7)
                    big[n + 7:2 * n + 7].copy_(vals.reshape(-1))
                    p.data = big[n + 7:2 * n + 7].view(p.shape)
                    holders[(S.tag, k)] = big
                elif how == "same-storage-new-offset":
                    if k == 2:
                        big = torch.zeros(3 * n)
                        holders[S.tag] = big
                        big[:n].copy_(vals.reshape(-1))
                        p.data = big[:n].view(p.shape)
                    else:
                        big = holders[S.tag]
                        big[2 * n:].copy_(vals.reshape(-1))
                        big[:n].fill_(7.0)
                        p.data = big[2 * n:].view(p.shape)
                elif how == "set_":
                    with torch.no_grad():
                        p.set_(vals)
                else:
                    with torch.no_grad():
                        p.mul_(0.5).add_(0.25)
            S.opt.step()
        assert_sides(T, F, f"step {k} ({how})")
        if how == "same-storage-new-offset" and k >= 4:
            assert torch.equal(holders["fused"][:F.p[0].numel()], torch.full((F.p[0].numel(),), 7.0)), \
                "fusedopt wrote into the param's old location in the same storage"


@pytest.mark.parametrize("name", NAMES)
def test_requires_grad_toggled(name):
    """torch.optim steps any param whose .grad is not None, whatever requires_grad says."""
    T, F = twin(name)
    G = make_grads(5, SHAPES, 15)
    for k in range(5):
        for S in (T, F):
            if k == 1:
                S.p[0].requires_grad_(False)
            if k == 3:
                S.p[0].requires_grad_(True)
                S.p[1].requires_grad_(False)
            set_grads(S, G[k])
            if k == 4:
                S.p[1].grad = None
            S.opt.step()
        assert_sides(T, F, f"step {k}")


def test_tensor_lr_edited_in_place_between_steps():
    """group['lr'] a 0-dim tensor (accepted by torch and fusedopt) edited in place: the next step
    must see the new value (a plan caching the value would not)."""
    for name in ["Adam", "SGD", "AdamW"]:
        T, F = twin(name, lr=torch.tensor(0.01))
        G = make_grads(5, SHAPES, 16)
        for k in range(5):
            for S in (T, F):
                set_grads(S, G[k])
                if k >= 1:
                    S.opt.param_groups[0]["lr"].fill_(0.01 * (k + 1))
                S.opt.step()
            assert_sides(T, F, f"{name} step {k}")


SCHEDULERS = {
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3,
                                                            cycle_momentum=True),
    "CosineWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "Sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.8)], milestones=[3]),
    "Plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name, sched", [(n, s) for n in ["SGD", "Adam", "RMSprop"] for s in SCHEDULERS
                                         if not (s == "CyclicLR" and n == "Adam")])  # Adam: no 'momentum'
def test_lr_schedulers(name, sched):
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]  # noqa: E731
    T, F = twin(name, groups=groups)
    scheds = {S.tag: SCHEDULERS[sched](S.opt) for S in (T, F)}
    G = make_grads(10, SHAPES, 17)
    for k in range(10):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
            if sched == "Plateau":
                scheds[S.tag].step(1.0)
            else:
                scheds[S.tag].step()
        for gt, gf in zip(T.opt.param_groups, F.opt.param_groups):
            for key in ("lr", "momentum", "betas"):
                if key in gt:
                    assert gt[key] == gf[key], f"step {k}: group {key}"
        assert_sides(T, F, f"step {k} ({sched})")


@pytest.mark.parametrize("change", ["grad-lost", "data", "state-setitem", "state-data", "list-replace"])
def test_change_in_a_middle_share_of_a_large_plan(change):
    """5,000 small params (the check runs in shares of 2,048): one change in the SECOND share."""
    torch.set_num_threads(2)
    shapes = [(3,)] * 5000
    T, F = twin("Adam", shapes=shapes)
    G = make_grads(4, shapes, 18)
    idx = 3000
    for k in range(4):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 2:
                p = S.p[idx]
                if change == "grad-lost":
                    p.grad = None
                elif change == "data":
                    p.data = p.detach().clone() + 1.0
                elif change == "state-setitem":
                    S.opt.state[p]["exp_avg"] = torch.full((3,), 0.5)
                elif change == "state-data":
                    S.opt.state[p]["exp_avg_sq"].data = torch.full((3,), 0.25)
                else:
                    q = torch.randn(3, generator=torch.Generator().manual_seed(1)).requires_grad_()
                    S.extra = q
                    S.opt.param_groups[0]["params"][idx] = q
                    q.grad = torch.ones(3)
            S.opt.step()
        torch.testing.assert_close(torch.stack([p.detach() for p in F.p]), torch.stack([p.detach() for p in T.p]),
                                   **TOL)
        if change == "list-replace" and k >= 2:
            torch.testing.assert_close(F.extra.detach(), T.extra.detach(), **TOL)
    assert_state_close(T.opt, F.opt, T.p[idx - 2:idx + 2], F.p[idx - 2:idx + 2], "around the change")


def test_non_contiguous_param_behaves_like_a_fresh_step():
    """p.data = a transposed (non-contiguous) tensor after plan steps: whatever a fresh fusedopt step
    does with such a param (steps like torch, or raises), a planned step does the same."""
    T, F = twin("Adam", shapes=[(4, 6), (5,)])
    G = make_grads(4, [(4, 6), (5,)], 19)
    for k in range(2):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
    # a fresh optimizer with the same state and a non-contiguous param
    ps = [p.detach().clone().requires_grad_() for p in F.p]
    fresh = fusedopt.Adam(ps, **PAIRS["Adam"][2])
    fresh.load_state_dict(copy.deepcopy(F.opt.state_dict()))
    ps[0].data = ps[0].detach().t().contiguous().t()
    set_grads(Side(ps, fresh, "x"), G[2])
    fresh_err = None
    try:
        fresh.step()
    except Exception as e:  # noqa: BLE001
        fresh_err = str(e)
    for S in (T, F):
        S.p[0].data = S.p[0].detach().t().contiguous().t()
        set_grads(S, G[2])
    if fresh_err is None:
        T.opt.step()
        F.opt.step()
        assert_sides(T, F, "non-contiguous param")
    else:
        with pytest.raises(Exception) as e:
            F.opt.step()
        assert str(e.value) == fresh_err


def test_empty_param_among_others():
    shapes = [(0,), (5, 0), (7,), (3, 3)]
    for name in NAMES:
        T, F = twin(name, shapes=shapes)
        G = make_grads(3, shapes, 20)
        for k in range(3):
            for S in (T, F):
                set_grads(S, G[k])
                S.opt.step()
            assert_sides(T, F, f"{name} step {k}")


# --------------------------------------------------------------------------------------------------
# Lion (no torch.optim oracle: a direct reference)


def lion_reference(params, grads_per_step, lr, betas, wd, edits=None):
    ps = [p.clone() for p in params]
    ms = [None] * len(ps)
    for k, grads in enumerate(grads_per_step):
        if edits:
            lr, betas, wd = edits(k, lr, betas, wd)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if ms[i] is None:
                ms[i] = torch.zeros_like(ps[i])
            c = ms[i] * betas[0] + g * (1 - betas[0])
            ps[i] = ps[i] * (1 - lr * wd) - lr * torch.sign(c)
            ms[i] = ms[i] * betas[1] + g * (1 - betas[1])
    return ps, ms


def test_lion_plan_edits_match_reference():
    """Lion with lost grads and betas/lr/weight_decay edits between steps vs a direct reference."""
    base = make_params(SHAPES, 21)
    G = make_grads(6, SHAPES, 22)
    for k, i in ((1, 0), (2, 2), (4, 0)):
        G[k][i] = None
    ps = [b.clone().requires_grad_() for b in base]
    opt = fusedopt.Lion(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)

    def edits(k, lr, betas, wd):
        if k == 2:
            lr = 0.02
        if k == 3:
            betas = (0.5, 0.9)
        if k == 4:
            wd = 0.0
        return lr, betas, wd

    for k in range(6):
        lr, betas, wd = edits(k, opt.param_groups[0]["lr"], opt.param_groups[0]["betas"],
                              opt.param_groups[0]["weight_decay"])
        opt.param_groups[0].update(lr=lr, betas=betas, weight_decay=wd)
        for p, g in zip(ps, G[k]):
            p.grad = None if g is None else g.clone()
        opt.step()
    ref_p, ref_m = lion_reference(base, G, 0.01, (0.9, 0.99), 0.1, edits)
    for i, (p, r) in enumerate(zip(ps, ref_p)):
        torch.testing.assert_close(p.detach(), r, **TOL, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_m[i], **TOL)


# --------------------------------------------------------------------------------------------------
# Flat storage


FLAT_OPTS = {**{n: (PAIRS[n][0], PAIRS[n][1], PAIRS[n][2]) for n in NAMES},
             "Lion": (fusedopt.Lion, None, dict(lr=1e-3, weight_decay=0.1))}


class MLP(nn.Module):
    """fp32 layers, an optional bf16 layer, an optional tied (shared) weight, a branch used only on
    request (its params get no grad otherwise), an optional frozen layer."""

    def __init__(self, bf16=False, tied=False, frozen=False):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.mid = nn.Linear(12, 12)
        self.branch = nn.Linear(12, 12)
        self.out = nn.Linear(12, 6)
        self.tied = tied
        if tied:
            self.out2 = nn.Linear(12, 6, bias=False)
            self.out2.weight = self.out.weight
        self.bf = nn.Linear(12, 12, dtype=torch.bfloat16) if bf16 else None
        self.frozen = nn.Linear(12, 12) if frozen else None
        if frozen:
            self.frozen.requires_grad_(False)

    def forward(self, x, use_branch=False):
        h = torch.tanh(self.inp(x))
        if self.frozen is not None:
            h = torch.tanh(self.frozen(h))
        if self.bf is not None:
            h = self.bf(h.bfloat16()).float()
        h = torch.tanh(self.mid(h))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        y = self.out(h)
        if self.tied:
            y = y + self.out2(h * 0.5)
        return y


def loss_of(model, x, use_branch=False):
    return model(x, use_branch).float().square().mean()


def weights_and_biases(model):
    return [{"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]},
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")],
             "lr": 3e-3}]


class Run:
    def __init__(self, model, opt, tag):
        self.m, self.opt, self.tag = model, opt, tag

    @property
    def params(self):
        return list(self.m.parameters())


def trio(name, seed=0, model_kw=None, groups=weights_and_biases, flatten="groups", with_torch=True, fused_kw=None,
         **over):
    """(torch run or None, plain fusedopt run, flat fusedopt run) on deep copies of one model."""
    fcls, tcls, kw = FLAT_OPTS[name]
    kw = {**kw, **over}
    fused_kw = fused_kw or {}
    torch.manual_seed(seed)
    base = MLP(**(model_kw or {}))
    runs = []
    for tag in ("torch", "plain", "flat"):
        if tag == "torch" and (not with_torch or tcls is None):
            runs.append(None)
            continue
        m = copy.deepcopy(base)
        if tag == "flat":
            fusedopt.flatten_(m if flatten == "module" else groups(m))
        if tag == "torch":
            runs.append(Run(m, tcls(groups(m), **kw), tag))
        else:
            runs.append(Run(m, fcls(groups(m), **kw, **fused_kw), tag))
    return runs


def batches(n, seed, rows=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 6, generator=g) for _ in range(n)]


def assert_flat_equal(P, Fl, what):
    """plain vs flat fusedopt: bit-identical params, grads and state."""
    for (n, a), b in zip(P.m.named_parameters(), Fl.m.parameters()):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"{what}: flat param {n} differs from unflattened"
        assert (a.grad is None) == (b.grad is None), f"{what}: grad presence of {n}: plain {a.grad is None} flat {b.grad is None}"
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}: grad of {n}: {m}")
    assert_state_close(P.opt, Fl.opt, P.params, Fl.params, what, exact=True)
    for (n, a), b in zip(P.m.named_parameters(), Fl.m.parameters()):
        for k, v in Fl.opt.state.get(b, {}).items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == b.shape, f"{what}: state {k} of {n} has shape {tuple(v.shape)}"


# RMSprop(centered=True) divides by sqrt(square_avg - grad_avg**2): with this model's small grads
# that difference cancels, so one rounding step apart in the inputs shows up as ~1e-4 relative.
LOOSE = {"RMSprop": dict(rtol=2e-4, atol=1e-5)}


def assert_torch_close(T, P, what, **tol):
    if T is None:
        return
    tol = tol or LOOSE.get(type(P.opt).__name__, TOL)
    for (n, a), b in zip(T.m.named_parameters(), P.m.parameters()):
        torch.testing.assert_close(b.detach().float(), a.detach().float(), **tol, msg=lambda m: f"{what}: {n}: {m}")
        assert (a.grad is None) == (b.grad is None), f"{what}: grad presence of {n}: torch {a.grad is None}"
    assert_state_close(T.opt, P.opt, T.params, P.params, what, **tol)


def check(T, P, Fl, what):
    assert_flat_equal(P, Fl, what)
    assert_torch_close(T, P, what)


@pytest.mark.parametrize("name", list(FLAT_OPTS))
def test_flat_mixed_dtype_groups_and_intermittent_grads(name):
    """fp32 + bf16 params, two groups, a branch that gets grads only on some steps, zero_grad with
    set_to_none alternating: flat == unflattened bit for bit."""
    _, P, Fl = trio(name, model_kw=dict(bf16=True), with_torch=False)
    xs = batches(7, 30)
    for k, x in enumerate(xs):
        for R in (P, Fl):
            R.opt.zero_grad(set_to_none=(k % 2 == 0))
            loss_of(R.m, x, use_branch=k in (1, 2, 5)).backward()
            R.opt.step()
        assert_flat_equal(P, Fl, f"step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_flat_set_to_none_then_branch_without_grad_is_skipped_like_torch(name):
    """After zero_grad(set_to_none=True), a param not used in the next forward keeps grad None and
    is not stepped (its state untouched), in flat storage as in torch."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(6, 31)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            assert all(p.grad is None for p in R.params), f"{R.tag}: grads not None after zero_grad()"
            loss_of(R.m, x, use_branch=k in (0, 3)).backward()
            if k not in (0, 3):
                assert R.m.branch.weight.grad is None, f"{R.tag} step {k}: unused param got a grad"
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_flat_tied_weights(name):
    T, P, Fl = trio(name, model_kw=dict(tied=True), flatten="module",
                    groups=lambda m: list(m.parameters()))
    assert len(list(Fl.m.parameters())) == len(list(P.m.parameters()))
    xs = batches(5, 32)
    for k, x in enumerate(xs):
        for R in filter(None, (T, P, Fl)):
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")
    assert Fl.m.out.weight is Fl.m.out2.weight


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_flat_frozen_params_then_unfrozen_via_add_param_group(name):
    """Frozen layer left out of flatten_(module) and the optimizer; later unfrozen and added with
    add_param_group (not flat)."""
    T, P, Fl = trio(name, model_kw=dict(frozen=True), flatten="module")
    assert Fl.m.frozen.weight.grad is None
    xs = batches(6, 33)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 3:
                R.m.frozen.requires_grad_(True)
                R.opt.add_param_group({"params": list(R.m.frozen.parameters()), "lr": 0.02})
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("zg", ["module-none", "module-zero", "optimizer-zero"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_module_zero_grad_and_accumulation(name, zg):
    """nn.Module.zero_grad (set_to_none or not) or the optimizer's zero_grad(set_to_none=False),
    with three backwards per step."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(12, 34)
    for k in range(4):
        for R in (T, P, Fl):
            if zg == "module-none":
                R.m.zero_grad()
            elif zg == "module-zero":
                R.m.zero_grad(set_to_none=False)
            else:
                R.opt.zero_grad(set_to_none=False)
            for x in xs[3 * k:3 * k + 3]:
                loss_of(R.m, x, use_branch=(k == 1)).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("clip", ["torch", "fusedopt"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_flat_clip_grad_norm_between_backward_and_step(name, clip):
    T, P, Fl = trio(name, flatten="module")
    xs = batches(5, 35)
    fn = torch.nn.utils.clip_grad_norm_ if clip == "torch" else fusedopt.clip_grad_norm_
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            (loss_of(R.m, x, use_branch=k == 2) * 50).backward()
            norm = fn(R.m.parameters(), 0.5)
            assert torch.isfinite(norm)
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_flat_manual_loss_scaling(name):
    """AMP-like scaling without GradScaler: scaled loss, grads divided in place (p.grad.mul_)."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(5, 36)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            (loss_of(R.m, x) * 1024.0).backward()
            for p in R.params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / 1024.0)
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("assign", ["replace", "add_", "plus"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_autograd_grad_manual_assignment(name, assign):
    """Grads from torch.autograd.grad, assigned to p.grad by hand, accumulated over two micro
    batches (p.grad = g, then p.grad.add_(g) / p.grad = p.grad + g); optimizer.zero_grad between
    steps. Then ordinary backward steps again."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(10, 37)
    for k in range(5):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            ps = R.params
            if k < 3:
                for j in range(2):
                    gs = torch.autograd.grad(loss_of(R.m, xs[2 * k + j]), ps, allow_unused=True)
                    for p, g in zip(ps, gs):
                        if g is None:
                            continue
                        if p.grad is None or assign == "replace" and j == 0:
                            p.grad = g
                        elif assign == "add_":
                            p.grad.add_(g)
                        else:
                            p.grad = p.grad + g
            else:
                loss_of(R.m, xs[2 * k]).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_grad_preseeded_after_set_to_none_is_accumulated_into(name):
    """After zero_grad(set_to_none=True) the user sets p.grad = t before backward: autograd
    accumulates into t (torch), fusedopt must not hand the param its zeroed flat grad instead."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(4, 38)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            R.m.mid.weight.grad = torch.full_like(R.m.mid.weight, 0.25)
            R.m.out.bias.grad = torch.full_like(R.m.out.bias, -0.5)
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_zero_grad_keep_zeroes_a_replaced_grad(name):
    """A grad replaced by a standalone tensor, then optimizer.zero_grad(set_to_none=False): torch
    zeroes that tensor (it is p.grad); a memset of the bucket alone would leave it."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(8, 39)
    for k in range(4):
        for R in (T, P, Fl):
            R.opt.zero_grad(set_to_none=False)
            for p in R.params:
                assert p.grad is None or not p.grad.any(), f"{R.tag} step {k}: grad not zeroed"
            loss_of(R.m, xs[2 * k]).backward()
            R.m.mid.weight.grad = R.m.mid.weight.grad.clone() * 3.0
            loss_of(R.m, xs[2 * k + 1]).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_flat_two_optimizers_share_a_bucket(set_to_none):
    """One bucket, two optimizers (Adam on the weights, SGD on the biases). Only opt_w zeroes every
    step; opt_b zeroes every other step, so the biases accumulate two backwards: opt_w.zero_grad must
    not touch the biases' grads."""
    torch.manual_seed(0)
    base = MLP()
    runs = []
    for tag in ("torch", "plain", "flat"):
        m = copy.deepcopy(base)
        if tag == "flat":
            fusedopt.flatten_(m)
        w = [p for n, p in m.named_parameters() if n.endswith("weight")]
        b = [p for n, p in m.named_parameters() if n.endswith("bias")]
        if tag == "torch":
            runs.append((m, torch.optim.Adam(w, lr=0.01), torch.optim.SGD(b, lr=0.05, momentum=0.9)))
        else:
            runs.append((m, fusedopt.Adam(w, lr=0.01), fusedopt.SGD(b, lr=0.05, momentum=0.9)))
    xs = batches(6, 40)
    for k, x in enumerate(xs):
        for m, ow, ob in runs:
            ow.zero_grad(set_to_none=set_to_none)
            if k % 2 == 0:
                ob.zero_grad(set_to_none=set_to_none)
            loss_of(m, x, use_branch=True).backward()
            ow.step()
            if k % 2 == 1:
                ob.step()
        (mt, *_), (mp, *_), (mf, *_) = runs
        for (n, a), b_, c in zip(mt.named_parameters(), mp.parameters(), mf.parameters()):
            assert torch.equal(b_, c), f"step {k}: flat {n} differs from plain"
            assert (b_.grad is None) == (c.grad is None)
            if c.grad is not None:
                assert torch.equal(b_.grad, c.grad), f"step {k}: flat grad of {n}"
            torch.testing.assert_close(b_.detach(), a.detach(), **TOL)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_flat_two_models_flattened_separately_one_optimizer(name):
    fcls, tcls, kw = PAIRS[name]
    torch.manual_seed(1)
    a0, b0 = MLP(), MLP()
    runs = []
    for tag in ("torch", "plain", "flat"):
        a, b = copy.deepcopy(a0), copy.deepcopy(b0)
        if tag == "flat":
            fusedopt.flatten_(a)
            fusedopt.flatten_(b)
        cls = tcls if tag == "torch" else fcls
        runs.append((a, b, cls([{"params": list(a.parameters())}, {"params": list(b.parameters()), "lr": 0.002}],
                               **kw)))
    xs = batches(5, 41)
    for k, x in enumerate(xs):
        for a, b, o in runs:
            o.zero_grad()
            (loss_of(a, x) + loss_of(b, x * 2, use_branch=True)).backward()
            o.step()
        pt = [p for m in runs[0][:2] for p in m.parameters()]
        pp = [p for m in runs[1][:2] for p in m.parameters()]
        pf = [p for m in runs[2][:2] for p in m.parameters()]
        for i, (x1, x2, x3) in enumerate(zip(pt, pp, pf)):
            assert torch.equal(x2, x3), f"step {k}: param {i} flat != plain"
            torch.testing.assert_close(x2.detach(), x1.detach(), **TOL)
        assert_state_close(runs[1][2], runs[2][2], pp, pf, f"step {k}", exact=True)


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_flatten_after_steps_moves_existing_state(name):
    """flatten_ called after the optimizer has state (docstring: state made before moves into flat
    state at the next step)."""
    T, P, Fl = None, None, None
    fcls, tcls, kw = PAIRS[name]
    torch.manual_seed(2)
    base = MLP()
    runs = [Run(copy.deepcopy(base), None, t) for t in ("torch", "plain", "flat")]
    for R in runs:
        R.opt = (tcls if R.tag == "torch" else fcls)(weights_and_biases(R.m), **kw)
    T, P, Fl = runs
    xs = batches(6, 42)
    for k, x in enumerate(xs):
        if k == 2:
            fusedopt.flatten_(weights_and_biases(Fl.m))
        for R in runs:
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("how", ["data-new", "reinit-inplace", "to-double-before-opt"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_model_modified_after_flatten(name, how):
    fcls, tcls, kw = PAIRS[name]
    torch.manual_seed(3)
    base = MLP()
    runs = [Run(copy.deepcopy(base), None, t) for t in ("torch", "plain", "flat")]
    fusedopt.flatten_(runs[2].m)
    if how == "to-double-before-opt":
        for R in runs:
            R.m.double()
    for R in runs:
        R.opt = (tcls if R.tag == "torch" else fcls)(weights_and_biases(R.m), **kw)
    T, P, Fl = runs
    dt = torch.float64 if how == "to-double-before-opt" else torch.float32
    xs = batches(6, 43)
    for k, x in enumerate(xs):
        for R in runs:
            if k == 2 and how == "data-new":
                R.m.mid.weight.data = R.m.mid.weight.detach().clone() * 0.5
            if k in (2, 4) and how == "reinit-inplace":
                g = torch.Generator().manual_seed(k)
                with torch.no_grad():
                    R.m.mid.weight.copy_(torch.randn(R.m.mid.weight.shape, generator=g))
                    R.m.out.bias.zero_()
            R.opt.zero_grad()
            loss_of(R.m, x.to(dt)).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_flat_load_state_dict_from_torch_mid_run_and_back(name):
    T, P, Fl = trio(name, flatten="module")
    xs = batches(6, 44)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x, use_branch=k >= 1).backward()
            R.opt.step()
        if k == 2:
            sd = T.opt.state_dict()
            P.opt.load_state_dict(copy.deepcopy(sd))
            Fl.opt.load_state_dict(copy.deepcopy(sd))
        check(T, P, Fl, f"step {k}")
    sd = Fl.opt.state_dict()
    in_order = [p for g in Fl.opt.param_groups for p in g["params"]]
    for i, p in enumerate(in_order):
        for key, v in sd["state"].get(i, {}).items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape, f"state_dict state {key} of param {i}: {tuple(v.shape)} vs {tuple(p.shape)}"
    T2 = type(T.opt)(weights_and_biases(T.m), **PAIRS[name][2])
    T2.load_state_dict(copy.deepcopy(sd))
    assert_state_close(T.opt, T2, T.params, T.params, "flat state_dict into torch", **LOOSE.get(name, TOL))


@pytest.mark.parametrize("how", ["copy_", "setitem", "data"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_flat_state_edits(name, how):
    key = STATE_KEY[name]
    T, P, Fl = trio(name, flatten="module")
    xs = batches(5, 45)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 2:
                p = R.m.mid.weight
                t = R.opt.state[p][key]
                new = t.detach().clone() * -0.5 + 0.01
                if how == "copy_":
                    t.copy_(new)
                elif how == "setitem":
                    R.opt.state[p][key] = new
                else:
                    t.data = new
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_param_removed_from_group_is_not_zeroed_by_the_optimizer(name):
    """After a param leaves the optimizer's groups, opt.zero_grad() must leave its grad alone
    (torch only zeroes the params it holds): the optimizer no longer owns the whole bucket."""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(6, 46)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 2:
                lst = R.opt.param_groups[0]["params"]
                del lst[[id(q) for q in lst].index(id(R.m.mid.weight))]
            R.opt.zero_grad(set_to_none=(k % 2 == 0))
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")
    # mid.weight's grad accumulated over steps 2..5 in all three
    torch.testing.assert_close(Fl.m.mid.weight.grad, T.m.mid.weight.grad, **TOL)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_group_edits_lr_and_add_param_group(name):
    fcls, tcls, kw = PAIRS[name]
    T, P, Fl = trio(name, flatten="module")
    extra0 = torch.randn(9, generator=torch.Generator().manual_seed(5))
    extras = {}
    xs = batches(6, 47)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.param_groups[0]["lr"] *= 0.8
            R.opt.param_groups[1]["weight_decay"] = 0.05 * k
            if k == 2:
                e = extra0.clone().requires_grad_()
                extras[R.tag] = e
                R.opt.add_param_group({"params": [e], "lr": 0.01})
            R.opt.zero_grad()
            loss = loss_of(R.m, x)
            if k >= 2:
                loss = loss + extras[R.tag].square().sum()
            loss.backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")
        if k >= 2:
            assert torch.equal(extras["plain"], extras["flat"])
            torch.testing.assert_close(extras["plain"].detach(), extras["torch"].detach(), **TOL)


def test_flat_requires_grad_toggled():
    T, P, Fl = trio("Adam", flatten="module")
    xs = batches(6, 48)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 2:
                R.m.mid.requires_grad_(False)
            if k == 4:
                R.m.mid.requires_grad_(True)
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


def test_flat_grad_scaler_cpu():
    T, P, Fl = trio("AdamW", flatten="module")
    scalers = {R.tag: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for R in (T, P, Fl)}
    xs = batches(6, 49)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            s = scalers[R.tag]
            loss = loss_of(R.m, x)
            if k == 3:
                loss = loss * float("inf")
            s.scale(loss).backward()
            s.step(R.opt)
            s.update()
        assert scalers["flat"].get_scale() == scalers["torch"].get_scale()
        check(T, P, Fl, f"step {k}")


# --------------------------------------------------------------------------------------------------
# More plan / flat edge cases


@pytest.mark.parametrize("name", NAMES)
def test_set_to_none_leaves_old_grad_tensors_alone_without_flat_storage(name):
    """torch: zero_grad(set_to_none=True) only drops the references; a grad tensor the user kept
    keeps its values, and the next backward does not write into it. fusedopt without flat storage
    too. (Flat storage hands each param its slot of the bucket back, like DDP's
    gradient_as_bucket_view: README, Flat storage.)"""
    T, P, Fl = trio(name, flatten="module")
    xs = batches(4, 50)
    for k, x in enumerate(xs):
        kept = {}
        for R in (T, P):
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            kept[R.tag] = [(p.grad, p.grad.clone()) for p in R.params if p.grad is not None]
            R.opt.step()
            R.opt.zero_grad()
            for g, v in kept[R.tag]:
                assert torch.equal(g, v), f"{R.tag} step {k}: zero_grad(set_to_none=True) changed a kept grad"
            loss_of(R.m, xs[(k + 1) % len(xs)] * 3).backward()
            for g, v in kept[R.tag]:
                assert torch.equal(g, v), f"{R.tag} step {k}: the next backward wrote into a kept grad"
            R.opt.step()
        # centered RMSprop's sqrt(square_avg - grad_avg**2) cancels: tripled grads here move an
        # input rounding to ~1e-5 absolute in the momentum buffer
        assert_torch_close(T, P, f"step {k}", **(dict(rtol=2e-4, atol=3e-5) if name == "RMSprop" else {}))


@pytest.mark.parametrize("what", ["state", "param"])
def test_flat_swapping_data_between_two_same_shaped_flat_tensors(what):
    """Two same-shaped flat params (mid.weight, branch.weight) swap their state tensors' (or their
    own) storage via .data: both stay views of the SAME flat buffer (a storage-identity check cannot
    see it), but torch now updates the other memory."""
    T, P, Fl = trio("Adam", flatten="module")
    xs = batches(5, 51)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 2:
                a, b = R.m.mid.weight, R.m.branch.weight
                if what == "state":
                    for key in ("exp_avg", "exp_avg_sq"):
                        sa, sb = R.opt.state[a][key], R.opt.state[b][key]
                        da, db = sa.data, sb.data
                        sa.data, sb.data = db, da
                else:
                    da, db = a.data, b.data
                    a.data, b.data = db, da
            R.opt.zero_grad()
            loss_of(R.m, x, use_branch=True).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


def test_flat_grads_present_before_flatten_are_moved():
    """backward, then flatten_, then optimizer + step: the existing grads move into the flat grads."""
    T, P, Fl = None, None, None
    torch.manual_seed(4)
    base = MLP()
    runs = [Run(copy.deepcopy(base), None, t) for t in ("torch", "plain", "flat")]
    x0 = batches(1, 52)[0]
    for R in runs:
        loss_of(R.m, x0).backward()
    fusedopt.flatten_(runs[2].m)
    for R in runs:
        R.opt = (torch.optim.SGD if R.tag == "torch" else fusedopt.SGD)(R.params, lr=0.1, momentum=0.9)
    T, P, Fl = runs
    for k, x in enumerate(batches(4, 53)):
        for R in runs:
            R.opt.step()
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
        check(T, P, Fl, f"step {k}")


def test_flatten_again_with_other_grouping_after_steps():
    T, P, Fl = trio("Adam", flatten="module")
    xs = batches(6, 54)
    for k, x in enumerate(xs):
        if k == 3:
            fusedopt.flatten_(weights_and_biases(Fl.m))
        for R in (T, P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x, use_branch=k % 2 == 0).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_flat_closure_step(name):
    T, P, Fl = trio(name, flatten="module")
    xs = batches(4, 55)
    for k, x in enumerate(xs):
        losses = {}
        for R in (T, P, Fl):
            def closure(R=R, x=x):
                R.opt.zero_grad()
                loss = loss_of(R.m, x)
                loss.backward()
                return loss
            losses[R.tag] = R.opt.step(closure)
        assert torch.equal(losses["plain"], losses["flat"])
        check(T, P, Fl, f"step {k}")


def test_whole_state_reset_and_param_groups_replaced():
    """opt.state replaced by a fresh defaultdict / opt.state.clear() (a common way to reset an
    optimizer), and opt.param_groups replaced by a new list."""
    from collections import defaultdict
    T, F = twin("Adam")
    G = make_grads(7, SHAPES, 56)
    for k in range(7):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 2:
                S.opt.state.clear()
            if k == 4:
                S.opt.state = defaultdict(dict)
            if k == 5:
                g0 = S.opt.param_groups[0]
                S.opt.param_groups = [dict(g0, params=S.p[:2]), dict(g0, params=S.p[2:], lr=0.05)]
            S.opt.step()
        assert_sides(T, F, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_load_state_dict_with_int_steps_and_other_group_options(name):
    """A state_dict whose 'step' entries are Python ints (older checkpoints) and whose groups carry
    other options than the constructor's (amsgrad / centered / momentum on)."""
    fcls, tcls, kw = PAIRS[name]
    other = {"Adam": dict(amsgrad=True, lr=0.003), "AdamW": dict(amsgrad=False, weight_decay=0.5),
             "RMSprop": dict(centered=False, momentum=0.0, alpha=0.9), "Adagrad": dict(lr_decay=0.1)}[name]
    T, F = twin(name)
    src_params = [p.detach().clone().requires_grad_() for p in T.p]
    src = tcls(src_params, **{**kw, **other})
    G = make_grads(6, SHAPES, 57)
    for k in range(2):
        set_grads(Side(src_params, src, "src"), G[k])
        src.step()
    sd = copy.deepcopy(src.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    for S in (T, F):
        S.opt.load_state_dict(copy.deepcopy(sd))
    for k in range(2, 6):
        for S in (T, F):
            set_grads(S, G[k])
            S.opt.step()
        assert_sides(T, F, f"step {k}")


def test_no_grads_at_all_then_grads():
    for name in NAMES:
        T, F = twin(name)
        G = make_grads(4, SHAPES, 58)
        for k in range(4):
            for S in (T, F):
                set_grads(S, G[k] if k != 1 else [None] * len(SHAPES))
                if k == 0:
                    for p in S.p:
                        p.grad = None
                S.opt.step()
            assert_sides(T, F, f"{name} step {k}")


def test_one_grad_tensor_shared_by_two_params():
    """p1.grad and p2.grad the same tensor object (same shape): torch reads it twice."""
    shapes = [(6, 3), (6, 3), (4,)]
    for name in NAMES:
        T, F = twin(name, shapes=shapes)
        G = make_grads(4, shapes, 59)
        for k in range(4):
            for S in (T, F):
                set_grads(S, G[k])
                if k >= 1:
                    S.p[1].grad = S.p[0].grad
                S.opt.step()
            assert_sides(T, F, f"{name} step {k}")


def test_empty_param_group_added_then_filled():
    T, F = twin("Adam")
    G = make_grads(5, SHAPES, 60)
    extra0 = torch.randn(5)
    ex = {}
    for k in range(5):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 1:
                S.opt.add_param_group({"params": [], "lr": 0.1})
            if k == 3:
                e = extra0.clone().requires_grad_()
                ex[S.tag] = e
                S.opt.param_groups[-1]["params"].append(e)
            if k >= 3:
                ex[S.tag].grad = torch.ones(5) * k
            S.opt.step()
        assert_sides(T, F, f"step {k}")
        if k >= 3:
            torch.testing.assert_close(ex["fused"].detach(), ex["torch"].detach(), **TOL)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_complex_params_with_plan_edits(name):
    fcls, tcls, kw = PAIRS[name]
    g = torch.Generator().manual_seed(61)
    base = [torch.randn(5, 3, dtype=torch.complex64, generator=g), torch.randn(7, generator=g)]
    sides = []
    for cls, tag in ((tcls, "torch"), (fcls, "fused")):
        ps = [b.clone().requires_grad_() for b in base]
        sides.append(Side(ps, cls(ps, **kw), tag))
    T, F = sides
    grads = [[torch.randn(5, 3, dtype=torch.complex64, generator=g), torch.randn(7, generator=g)] for _ in range(5)]
    for k in range(5):
        for S in (T, F):
            set_grads(S, grads[k])
            if k == 2:
                S.p[0].grad = None
            if k == 3:
                S.p[0].data = S.p[0].detach().clone() * (0.5 + 0.5j)
            S.opt.step()
        for a, b in zip(T.p, F.p):
            torch.testing.assert_close(b.detach(), a.detach(), **TOL)
        assert_state_close(T.opt, F.opt, T.p, F.p, f"step {k}")


# --------------------------------------------------------------------------------------------------
# Options: max_grad_norm, master weights, state_dtype, in-kernel schedules


def _total_norm(grads, norm_type):
    grads = [g for g in grads if g is not None]
    if norm_type == math.inf:
        return max(g.abs().max() for g in grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads]),
                                    norm_type)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adagrad"])
def test_max_grad_norm_matches_clip_then_step_with_edits(name, norm_type):
    """max_grad_norm == clip_grad_norm_(all params with grads) + torch step; lost grads are not in
    the norm; max_grad_norm changed / turned off / on between steps; p.grad stays unclipped."""
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]  # noqa: E731
    T, F = twin(name, groups=groups)
    F.opt.max_grad_norm = 0.5
    F.opt.grad_norm_type = norm_type
    limits = [0.5, 0.5, 2.0, None, 0.3, 0.3, 0.3]
    G = make_grads(len(limits), SHAPES, 62)
    for k, lim in enumerate(limits):
        F.opt.max_grad_norm = lim
        for S in (T, F):
            set_grads(S, [g * 3 for g in G[k]])
            if k in (1, 4):
                S.p[3].grad = None
            if k == 5:
                S.p[1].grad = S.p[1].grad.t().contiguous().t() if S.p[1].grad.dim() == 2 else S.p[1].grad
                S.p[0].grad = torch.full_like(S.p[0], 0.1)
        raw = [None if p.grad is None else p.grad.clone() for p in F.p]
        if lim is not None:
            torch.nn.utils.clip_grad_norm_([p for p in T.p if p.grad is not None], lim, norm_type=norm_type)
        T.opt.step()
        F.opt.step()
        for p, r in zip(F.p, raw):
            if r is not None:
                assert torch.equal(p.grad, r), f"step {k}: p.grad was changed by the clipped step"
        if lim is not None:
            torch.testing.assert_close(F.opt.grad_norm.double(), _total_norm(raw, norm_type).double(), rtol=1e-5,
                                       atol=1e-6)
        assert_sides(T, F, f"step {k} (max_grad_norm={lim})")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_flat_max_grad_norm_bit_identical_and_like_torch(name):
    T, P, Fl = trio(name, flatten="module", fused_kw=dict(max_grad_norm=0.05))
    xs = batches(6, 63)
    for k, x in enumerate(xs):
        for R in filter(None, (T, P, Fl)):
            R.opt.zero_grad()
            loss_of(R.m, x * 5, use_branch=k in (2, 3)).backward()
            if k == 4:
                R.m.mid.bias.grad = None
                R.m.out.weight.grad = R.m.out.weight.grad.clone() * 2
        if T is not None:
            torch.nn.utils.clip_grad_norm_([p for p in T.params if p.grad is not None], 0.05)
        for R in filter(None, (T, P, Fl)):
            R.opt.step()
        assert torch.equal(P.opt.grad_norm, Fl.opt.grad_norm)
        check(T, P, Fl, f"step {k}")


def _bf16_pair(name, shapes, seed, **opts):
    """fusedopt on bf16 params (with opts) and torch on float32 copies of the same values."""
    fcls, tcls, kw = PAIRS[name]
    base = [b.bfloat16() for b in make_params(shapes, seed)]
    tp = [b.float().requires_grad_() for b in base]
    fp = [b.clone().requires_grad_() for b in base]
    return Side(tp, tcls(tp, **kw), "torch"), Side(fp, fcls(fp, **kw, **opts), "fused")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_master_weights_follow_float32_torch_through_edits(name):
    """bf16 params with master_weights: the master follows torch.optim on float32 copies; lost
    grads, lr edits, add_param_group and a load_state_dict from torch on the way; master_remainders
    bit-identical to master_weights."""
    # state_dtype=float32: torch's oracle runs on float32 params, so its moments are float32
    T, F = _bf16_pair(name, SHAPES, 64, master_weights=True, state_dtype=torch.float32)
    _, R = _bf16_pair(name, SHAPES, 64, master_weights=True, master_remainders=True, state_dtype=torch.float32)
    G = make_grads(7, SHAPES, 65)
    extra = torch.randn(6).bfloat16()
    for k in range(7):
        grads = [g.bfloat16() for g in G[k]]
        for S in (T, F, R):
            for p, g in zip(S.p, grads):
                p.grad = g.float() if S.tag == "torch" else g.clone()
            if k == 2:
                S.p[1].grad = None
            if k == 3:
                S.opt.param_groups[0]["lr"] *= 3
                e = extra.float() if S.tag == "torch" else extra.clone()
                S.p.append(e.requires_grad_())
                S.opt.add_param_group({"params": [S.p[-1]], "lr": 0.02})
            if k >= 3:
                S.p[-1].grad = torch.full_like(S.p[-1], 0.5 * (k - 2))
            S.opt.step()
        if k == 4:
            sd = T.opt.state_dict()
            F.opt.load_state_dict(copy.deepcopy(sd))
            R.opt.load_state_dict(copy.deepcopy(sd))
            with torch.no_grad():  # masters start from the params: give torch the same starting point
                for tp, fp in zip(T.p, F.p):
                    tp.copy_(fp.float())
        for i, (tp, fp, rp) in enumerate(zip(T.p, F.p, R.p)):
            assert fp.dtype == torch.bfloat16
            assert torch.equal(fp, rp), f"step {k}: master_remainders differs from master_weights (param {i})"
            master = F.opt.state[fp].get("master_param") if F.opt.state.get(fp) else None
            if master is not None:
                torch.testing.assert_close(master, tp.detach(), **TOL,
                                           msg=lambda m: f"step {k}: master of param {i}: {m}")
            torch.testing.assert_close(fp.float(), tp.detach(), rtol=2 ** -7, atol=1e-6)
        for i, (tp, fp) in enumerate(zip(T.p, F.p)):
            for key, v in T.opt.state.get(tp, {}).items():
                if torch.is_tensor(v) and v.dim() > 0:
                    torch.testing.assert_close(F.opt.state[fp][key].float(), v, **TOL)


@pytest.mark.parametrize("opts", [dict(master_weights=True), dict(master_weights=True, master_remainders=True),
                                  dict(state_dtype=torch.bfloat16), dict(stochastic_rounding=True)])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Lion"])
def test_flat_precision_options_bit_identical(name, opts):
    """bf16 model (flat) vs the same unflattened, with the precision options, lost grads and a
    load_state_dict round trip on the way."""
    if opts.get("stochastic_rounding") and name != "Lion":
        opts = dict(opts)  # stochastic rounding: the README says it merges nothing; still identical
    fcls = FLAT_OPTS[name][0]
    kw = FLAT_OPTS[name][2]
    torch.manual_seed(5)
    base = MLP().bfloat16()
    P = Run(copy.deepcopy(base), None, "plain")
    Fl = Run(copy.deepcopy(base), None, "flat")
    fusedopt.flatten_(Fl.m)
    for R in (P, Fl):
        R.opt = fcls(weights_and_biases(R.m), **kw, **opts)
    xs = batches(6, 66)
    for k, x in enumerate(xs):
        for R in (P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x.bfloat16(), use_branch=k in (1, 4)).backward()
            if k == 3:
                R.m.out.bias.grad = None
            torch.manual_seed(100 + k)
            R.opt.step()
            if k == 2:
                R.opt.load_state_dict(copy.deepcopy(R.opt.state_dict()))
        assert_flat_equal(P, Fl, f"step {k}")


def test_state_dtype_bf16_loads_torch_state_and_tracks_torch():
    fcls, tcls, kw = PAIRS["Adam"]
    base = make_params(SHAPES, 67)
    tp = [b.clone().requires_grad_() for b in base]
    fp = [b.clone().requires_grad_() for b in base]
    T, F = Side(tp, tcls(tp, **kw), "torch"), Side(fp, fcls(fp, **kw, state_dtype=torch.bfloat16), "fused")
    G = make_grads(6, SHAPES, 68)
    for k in range(6):
        for S in (T, F):
            set_grads(S, G[k])
            if k == 1:
                S.p[2].grad = None
            S.opt.step()
        if k == 2:
            F.opt.load_state_dict(copy.deepcopy(T.opt.state_dict()))
            for p in F.p:
                assert F.opt.state[p]["exp_avg"].dtype == torch.bfloat16
        for a, b in zip(T.p, F.p):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("edit", ["none", "group-without-grads", "all-without-grads", "param-lost"])
def test_in_kernel_schedule_follows_host_schedule(edit, flat):
    """A closed-form schedule in the kernel vs torch's host scheduler, stepped every iteration even
    when a group (or every param) has no grad that step."""
    T, P, Fl = trio("Adam", flatten="module")
    R = Fl if flat else P
    sched_t = torch.optim.lr_scheduler.CosineAnnealingLR(T.opt, T_max=8, eta_min=1e-4)
    sched_f = fusedopt.lr_scheduler.in_kernel(torch.optim.lr_scheduler.CosineAnnealingLR(R.opt, T_max=8,
                                                                                         eta_min=1e-4))
    assert R.opt.lr_schedule_mode == "in-kernel"
    xs = batches(8, 69)
    for k, x in enumerate(xs):
        for S in (T, R):
            S.opt.zero_grad()
            loss_of(S.m, x).backward()
            if k == 3:
                if edit == "group-without-grads":
                    for p in S.opt.param_groups[1]["params"]:
                        p.grad = None
                elif edit == "all-without-grads":
                    for p in S.params:
                        p.grad = None
                elif edit == "param-lost":
                    S.m.mid.weight.grad = None
            S.opt.step()
        sched_t.step()
        sched_f.step()
        assert [float(g["lr"]) for g in R.opt.param_groups] == pytest.approx(
            [float(g["lr"]) for g in T.opt.param_groups], rel=1e-6), f"step {k}: lr"
        assert_torch_close(T, R, f"step {k}")


ACTIONS = ["opt_none", "opt_zero", "mod_none", "mod_zero", "p_none", "p_replace", "p_preseed", "backward",
           "backward", "backward_subset", "backward", "step", "step", "data_new", "grad_mul"]


@pytest.mark.parametrize("seed", range(6))
def test_flat_zero_grad_backward_step_fuzz(seed):
    """Random sequences of every way to zero / drop / replace / accumulate grads, interleaved with
    steps: after every action the flat run's grads equal the plain run's (presence and values) and
    torch's; params and state too."""
    name = ["Adam", "SGD", "AdamW"][seed % 3]
    T, P, Fl = trio(name, flatten="module")
    rng = torch.Generator().manual_seed(1000 + seed)
    xs = batches(40, 70 + seed)
    names = [n for n, _ in Fl.m.named_parameters()]
    log = []
    for t in range(40):
        act = ACTIONS[int(torch.randint(len(ACTIONS), (1,), generator=rng))]
        i = int(torch.randint(len(names), (1,), generator=rng))
        log.append(f"{act}({names[i]})" if act.startswith(("p_", "data", "grad")) else act)
        for R in (T, P, Fl):
            ps = dict(R.m.named_parameters())
            p = ps[names[i]]
            if act == "opt_none":
                R.opt.zero_grad()
            elif act == "opt_zero":
                R.opt.zero_grad(set_to_none=False)
            elif act == "mod_none":
                R.m.zero_grad()
            elif act == "mod_zero":
                R.m.zero_grad(set_to_none=False)
            elif act == "p_none":
                p.grad = None
            elif act == "p_replace":
                if p.grad is not None:
                    p.grad = p.grad.clone() * 0.5
            elif act == "p_preseed":
                if p.grad is None:
                    p.grad = torch.full_like(p, 0.01)
            elif act == "backward":
                loss_of(R.m, xs[t], use_branch=t % 3 == 0).backward()
            elif act == "backward_subset":
                torch.autograd.backward(loss_of(R.m, xs[t]), inputs=[ps["mid.weight"], ps["out.bias"]])
            elif act == "step":
                R.opt.step()
            elif act == "data_new":
                p.data = p.detach().clone()
            elif act == "grad_mul":
                if p.grad is not None:
                    p.grad.mul_(2.0)
        check(T, P, Fl, f"after {' '.join(log)}")


@pytest.mark.parametrize("name", NAMES)
def test_param_appended_to_a_second_group_list_is_refused(name):
    """add_param_group refuses a param already held, but a direct list edit does not: torch then
    steps the param once per occurrence, in sequence. A fused step updates each param once, so
    fusedopt refuses the list, naming both places, and changes nothing."""
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]  # noqa: E731
    T, F = twin(name, groups=groups)
    G = make_grads(4, SHAPES, 75)
    set_grads(F, G[0])
    F.opt.step()
    set_grads(F, G[1])
    F.opt.param_groups[1]["params"].append(F.p[0])
    before = [p.detach().clone() for p in F.p]
    k = len(F.opt.param_groups[1]["params"]) - 1
    with pytest.raises(ValueError, match=re.escape(f"param_groups[1]['params'][{k}] is the same tensor as "
                                                   "param_groups[0]['params'][0]")):
        F.opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(F.p, before))
    F.opt.param_groups[1]["params"].pop()
    F.opt.step()  # the list mended: steps again


def test_non_finite_norm_with_max_grad_norm_skips_step_entirely_flat():
    """README: a non-finite norm skips the step (nothing changes, counters do not advance); then
    training goes on like torch that skipped that step, in flat storage too."""
    T, P, Fl = trio("Adam", flatten="module", fused_kw=dict(max_grad_norm=1.0))
    xs = batches(6, 76)
    for k, x in enumerate(xs):
        before = {R.tag: ([p.detach().clone() for p in R.params],
                          [snapshot(R.opt, p) for p in R.params]) for R in (P, Fl)}
        for R in (T, P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            if k == 3:
                R.m.mid.weight.grad[0, 0] = float("nan")
        if k != 3:
            torch.nn.utils.clip_grad_norm_(T.params, 1.0)
            T.opt.step()
        for R in (P, Fl):
            R.opt.step()
        if k == 3:
            for R in (P, Fl):
                assert not torch.isfinite(R.opt.grad_norm)
                ps, sts = before[R.tag]
                for p, b, st in zip(R.params, ps, sts):
                    assert torch.equal(p, b), f"{R.tag}: a param changed in a skipped step"
                    for key, v in st.items():
                        if torch.is_tensor(v):
                            assert torch.equal(R.opt.state[p][key], v), f"{R.tag}: state {key} changed"
        assert_flat_equal(P, Fl, f"step {k}")
        for a, b in zip(T.params, P.params):
            torch.testing.assert_close(b.detach(), a.detach(), **TOL)


def test_flat_grad_scaler_with_max_grad_norm_vs_unscale_clip_step():
    T, P, Fl = trio("AdamW", flatten="module", fused_kw=dict(max_grad_norm=0.02))
    scalers = {R.tag: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) for R in (T, P, Fl)}
    xs = batches(6, 77)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            s = scalers[R.tag]
            s.scale(loss_of(R.m, x, use_branch=k == 2)).backward()
            if R.tag == "torch":
                s.unscale_(R.opt)
                torch.nn.utils.clip_grad_norm_(R.params, 0.02)
            s.step(R.opt)
            s.update()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad"])
def test_flat_torch_impl_flags_accepted_and_tensor_lr_edited_in_place(name):
    flags = dict(foreach=True) if name == "Adagrad" else dict(foreach=False, fused=None)
    lr0 = {"Adam": 0.01, "SGD": 0.05, "Adagrad": 0.05}[name]
    T, P, Fl = trio(name, flatten="module", lr=lr0, **flags)
    for R in (T, P, Fl):  # a 0-dim tensor lr of its own in each group of each optimizer
        for g in R.opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]))
    xs = batches(5, 78)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            for g in R.opt.param_groups:
                if torch.is_tensor(g["lr"]):
                    g["lr"].mul_(0.7)
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


def test_flatten_list_with_empty_and_scalar_params():
    g = torch.Generator().manual_seed(79)
    shapes = [(0,), (), (4, 3), (0, 5), (7,)]
    base = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    runs = {}
    for tag in ("torch", "plain", "flat"):
        ps = [b.clone().requires_grad_() for b in base]
        if tag == "flat":
            fusedopt.flatten_(ps)
        cls = torch.optim.Adam if tag == "torch" else fusedopt.Adam
        runs[tag] = (ps, cls(ps, lr=0.1))
    for k in range(4):
        for ps, o in runs.values():
            for p, gr in zip(ps, grads[k]):
                p.grad = gr.clone() if k != 2 else None
            o.step()
        for a, b, c in zip(runs["torch"][0], runs["plain"][0], runs["flat"][0]):
            assert torch.equal(b, c)
            torch.testing.assert_close(b.detach(), a.detach(), **TOL)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_deepcopy_of_model_and_optimizer_continues_identically(name):
    """copy.deepcopy({'model', 'opt'}) of a flat run mid-training: the copy trains on exactly like
    the original (flat vs not is bit-identical)."""
    _, P, Fl = trio(name, flatten="module", with_torch=False)
    xs = batches(6, 80)
    for k, x in enumerate(xs[:3]):
        for R in (P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
    c = copy.deepcopy({"m": Fl.m, "o": Fl.opt})
    C = Run(c["m"], c["o"], "copy")
    for k, x in enumerate(xs[3:]):
        for R in (P, Fl, C):
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        assert_flat_equal(P, Fl, f"step {k}")
        assert_flat_equal(P, C, f"copy step {k}")


def test_flat_module_load_state_dict_in_place():
    """model.load_state_dict(...) (copies into the flat views) after some steps."""
    T, P, Fl = trio("Adam", flatten="module")
    xs = batches(5, 81)
    torch.manual_seed(9)
    sd = MLP().state_dict()
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            if k == 2:
                R.m.load_state_dict(sd)
            R.opt.zero_grad()
            loss_of(R.m, x).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")


def test_flat_grads_swapped_between_same_shaped_params():
    T, P, Fl = trio("Adam", flatten="module")
    xs = batches(5, 82)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            loss_of(R.m, x, use_branch=True).backward()
            if k in (1, 3):
                a, b = R.m.mid.weight, R.m.branch.weight
                a.grad, b.grad = b.grad, a.grad
            R.opt.step()
        check(T, P, Fl, f"step {k}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_channels_last_params(name):
    """Conv params in channels_last (dense but not contiguous), with lost grads mid-run."""
    fcls, tcls, kw = PAIRS[name]
    torch.manual_seed(10)
    m0 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3)).to(memory_format=torch.channels_last)
    mt, mf = copy.deepcopy(m0), copy.deepcopy(m0)
    ot, of = tcls(mt.parameters(), **kw), fcls(mf.parameters(), **kw)
    g = torch.Generator().manual_seed(11)
    for k in range(4):
        x = torch.randn(2, 3, 7, 7, generator=g).to(memory_format=torch.channels_last)
        for m, o in ((mt, ot), (mf, of)):
            o.zero_grad()
            m(x).square().mean().backward()
            if k == 2:
                m[0].weight.grad = None
            o.step()
        for a, b in zip(mt.parameters(), mf.parameters()):
            torch.testing.assert_close(b.detach(), a.detach(), **LOOSE.get(name, TOL))


@pytest.mark.parametrize("name", NAMES)
def test_param_resized_with_state_reset(name):
    """Network surgery: p.data = a tensor of another shape and its state deleted (torch re-creates
    it at the next step)."""
    require_oracle_for_missing_state(name)
    T, F = twin(name)
    G = make_grads(5, SHAPES, 83)
    for k in range(5):
        for S in (T, F):
            if k == 2:
                S.p[0].data = torch.linspace(-1, 1, 60).view(10, 6)
                S.opt.state.pop(S.p[0], None)
            grads = list(G[k])
            if k >= 2:
                grads[0] = torch.cos(torch.arange(60.0) * (k + 1)).view(10, 6)
            set_grads(S, grads)
            S.opt.step()
        assert_sides(T, F, f"step {k}")


def test_flat_grad_scaler_grads_are_unscaled_in_place_like_torch():
    """After scaler.step(opt), torch's p.grad holds the unscaled grads; so must fusedopt's (flat)."""
    T, P, Fl = trio("Adam", flatten="module")
    scalers = {R.tag: torch.amp.GradScaler("cpu", init_scale=2.0 ** 6) for R in (T, P, Fl)}
    xs = batches(4, 84)
    for k, x in enumerate(xs):
        for R in (T, P, Fl):
            R.opt.zero_grad()
            scalers[R.tag].scale(loss_of(R.m, x)).backward()
            scalers[R.tag].step(R.opt)
            scalers[R.tag].update()
        check(T, P, Fl, f"step {k}")
        for (n, a), b in zip(T.m.named_parameters(), Fl.m.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda m: f"step {k}: grad of {n}: {m}")


@pytest.mark.parametrize("how", ["swap", "move"])
def test_state_dicts_swapped_or_moved_between_params_plain(how):
    """opt.state[a], opt.state[b] = opt.state[b], opt.state[a] (inner dicts unedited; only the
    outer mapping changes), or opt.state[b] = opt.state.pop(a)."""
    shapes = [(6, 4), (6, 4), (9,)]
    # a moved state leaves its param without one: torch versions whose Adagrad cannot re-create
    # it give no oracle for that
    names = [n for n in NAMES if how == "swap" or has_oracle_for_missing_state(n)]
    assert "Adam" in names
    for name in names:
        T, F = twin(name, shapes=shapes)
        G = make_grads(5, shapes, 85)
        for k in range(5):
            for S in (T, F):
                set_grads(S, G[k])
                if k == 2:
                    a, b = S.p[0], S.p[1]
                    if how == "swap":
                        S.opt.state[a], S.opt.state[b] = S.opt.state[b], S.opt.state[a]
                    else:
                        S.opt.state[b] = S.opt.state.pop(a)
                S.opt.step()
            assert_sides(T, F, f"{name} step {k} ({how})")


@pytest.mark.parametrize("how", ["swap", "move", "copy-of-other"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad", "Lion"])
def test_state_dicts_swapped_or_moved_between_params_flat(name, how):
    """The same outer-mapping edits with flat storage (and, as a control, a state dict replaced by
    a deep copy of another param's)."""
    if how == "move":
        require_oracle_for_missing_state(name)
    T, P, Fl = trio(name, flatten="module")
    xs = batches(5, 86)
    for k, x in enumerate(xs):
        for R in filter(None, (T, P, Fl)):
            if k == 2:
                a, b = R.m.mid.weight, R.m.branch.weight
                if how == "swap":
                    R.opt.state[a], R.opt.state[b] = R.opt.state[b], R.opt.state[a]
                elif how == "move":
                    R.opt.state[b] = R.opt.state.pop(a)
                else:
                    R.opt.state[b] = copy.deepcopy(dict(R.opt.state[a]))
            R.opt.zero_grad()
            loss_of(R.m, x, use_branch=True).backward()
            R.opt.step()
        check(T, P, Fl, f"step {k}")
