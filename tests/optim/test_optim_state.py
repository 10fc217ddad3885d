"""(2) Optimizer state: same keys as torch, state_dict interchangeable with torch.optim in both
directions (through a real torch.save/torch.load checkpoint), exact resumption, ``step`` stays a
tensor, and old checkpoints (python-number ``step``, param_groups missing newer keys) load.

These runs use float64 so that "continues exactly like an uninterrupted torch run" can be checked
at 1e-12 (only rounding-order differences are left); fusedopt -> fusedopt resumption is checked
bit for bit.
"""

import copy

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    Side,
    assert_pair_close,
    assert_same_state_keys,
    build_pair,
    copy_hparams,
    feed_same_grads,
    fused_cls,
    leaf,
    make_gen,
    ref_kwargs,
    roundtrip,
    state_of,
    step_value,
    torch_cls,
)

DT = torch.float64
K1, K2 = 7, 9  # steps before / after the checkpoint

CONFIGS = [
    ("SGD", dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.01)),  # momentum 0: torch keeps no state at all
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True, maximize=True, decoupled_weight_decay=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
]
IDS = [f"{n}-" + "-".join(f"{k}={v}" for k, v in c.items()) for n, c in CONFIGS]
GROUPS = [[(3, 4), (5,)], [(7,)]]


def group_specs(name):
    second = {"lr": 0.02}
    if name != "SGD":
        second["betas"] = (0.8, 0.99)
    return [(GROUPS[0], {}), (GROUPS[1], second)]


def steps(sides, gen, n, tracker=None):
    """Step every side n times with identical grads (sides[0] is the side whose dtype rules)."""
    for _ in range(n):
        g = None
        for s in sides:
            if g is None:
                g = [torch.randn(p.shape, generator=gen, dtype=DT).to(p.device) for p in s.params]
            s.set_grads(g)
            s.step()
        if tracker is not None:
            tracker.update(sides[0])


def as_default_torch_checkpoint(sd):
    """The oracle is built with foreach=False, fused=False; a checkpoint of a default-constructed
    torch optimizer carries foreach=None, fused=None - which is what users will load."""
    sd = dict(sd)
    sd["param_groups"] = [dict(g, foreach=None, fused=None) for g in sd["param_groups"]]
    return sd


def fresh(cls_fn, name, like, ctor, *, fused):
    """A new optimizer of ``cls_fn(name)`` over clones of ``like``'s current params, same groups."""
    params = [leaf(p.detach(), p.dtype, p.device) for p in like.params]
    groups, i = [], 0
    for g in like.opt.param_groups:
        n = len(g["params"])
        hp = {k: v for k, v in g.items() if k not in ("params", "initial_lr", "fused", "foreach")}
        groups.append({"params": params[i : i + n], **copy_hparams(hp)})
        i += n
    kw = copy_hparams(ctor) if fused else ref_kwargs(copy_hparams(ctor))
    if not fused:
        for g in groups:  # the oracle always runs its for-loop implementation
            g["foreach"], g["fused"] = False, False
    return Side(cls_fn(name)(groups, **kw), params)


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_state_keys_and_step_tensor(name, ctor, device):
    ref, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(5)
    for t in range(1, 4):
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
        assert_same_state_keys(ref, fo, f"after step {t}")
        for pr, pf in zip(ref.params, fo.params):
            sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
            if "step" in sr:
                assert step_value(sf["step"]) == step_value(sr["step"]) == t
            for k, v in sr.items():
                if k != "step":
                    assert sf[k].dtype == v.dtype and sf[k].shape == v.shape and sf[k].device == pf.device, k
    if name == "SGD" and not ctor.get("momentum"):
        assert fo.opt.state_dict()["state"] == {}, "torch.optim.SGD without momentum keeps no state"


def _compare_state_dict_layout(sd_ref, sd_fo):
    """state_dict structure equals torch's: same param ids, same group keys and hyperparameters.
    fused/foreach values are not compared here only because the oracle is built with
    foreach=False, fused=False while fusedopt gets the defaults (they are compared exactly in
    test_optim_constructor.py)."""
    assert sorted(sd_fo["state"]) == sorted(sd_ref["state"])
    for k in sd_ref["state"]:
        assert set(sd_fo["state"][k]) == set(sd_ref["state"][k])
    assert len(sd_fo["param_groups"]) == len(sd_ref["param_groups"])
    for gr, gf in zip(sd_ref["param_groups"], sd_fo["param_groups"]):
        assert set(gf) == set(gr), f"param_group keys differ: {sorted(set(gf) ^ set(gr))}"
        for key in gr:
            if key in ("fused", "foreach"):
                continue
            a, b = gf[key], gr[key]
            if torch.is_tensor(b):
                assert torch.is_tensor(a) and torch.equal(a, b), key
            else:
                assert a == b, f"param_group[{key!r}]: fusedopt {a!r} != torch {b!r}"


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_state_dict_layout_matches_torch(name, ctor, device):
    ref, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(5)
    for _ in range(3):
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
    _compare_state_dict_layout(ref.opt.state_dict(), fo.opt.state_dict())
    # and it survives a weights_only checkpoint (no custom objects inside)
    _compare_state_dict_layout(ref.opt.state_dict(), roundtrip(fo.opt.state_dict()))


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_torch_checkpoint_resumes_in_fusedopt(name, ctor, device):
    """torch.optim state_dict -> fusedopt; continues like the uninterrupted torch run."""
    ref, _ = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(11)
    tr = MagnitudeTracker()
    steps([ref], gen, K1, tr)
    fo = fresh(fused_cls, name, ref, ctor, fused=True)
    fo.opt.load_state_dict(roundtrip(as_default_torch_checkpoint(ref.opt.state_dict())))
    assert_pair_close(ref, fo, DT, "right after load", tracker=tr)
    steps([ref, fo], gen, K2, tr)
    assert_pair_close(ref, fo, DT, f"{K2} steps after resuming a torch checkpoint in fusedopt", tracker=tr)


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_fusedopt_checkpoint_resumes_in_torch(name, ctor, device):
    """fusedopt state_dict -> torch.optim; compared with a torch run that never stopped."""
    ref, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(11)
    tr = MagnitudeTracker()
    steps([ref, fo], gen, K1, tr)
    back = fresh(torch_cls, name, fo, ctor, fused=False)
    back.opt.load_state_dict(roundtrip(fo.opt.state_dict()))
    for g in back.opt.param_groups:
        assert not g.get("differentiable", False)
    steps([ref, back], gen, K2, tr)
    assert_pair_close(ref, back, DT, "torch resumed from a fusedopt checkpoint vs uninterrupted torch", tracker=tr)


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_fusedopt_resume_is_bitwise_exact(name, ctor, device):
    _, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(11)
    steps([fo], gen, K1)
    sd = roundtrip(fo.opt.state_dict())
    resumed = fresh(fused_cls, name, fo, ctor, fused=True)
    resumed.opt.load_state_dict(sd)
    steps([fo, resumed], gen, K2)
    for i, (a, b) in enumerate(zip(fo.params, resumed.params)):
        assert torch.equal(a, b), f"param {i} differs after resuming fusedopt from its own checkpoint"
        sa, sb = state_of(fo.opt, a), state_of(resumed.opt, b)
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]).cpu(), torch.as_tensor(sb[k]).cpu()), k


def _make_old_checkpoint(sd, name, step_as):
    """A checkpoint as written by older torch versions: python-number steps, groups without
    the keys torch added later (they are filled in by __setstate__). Or by other tools: a step
    counter tensor of another dtype than torch makes (torch.optim goes on counting in it)."""
    sd = copy.deepcopy(sd)
    forms = {"int": int, "float": float, "int64-tensor": lambda v: torch.tensor(int(v)),
             "float16-tensor": lambda v: torch.tensor(v, dtype=torch.float16)}
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = forms[step_as](st["step"].item())
    newer = {
        "SGD": ("nesterov", "maximize", "foreach", "differentiable", "fused"),
        "Adam": ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
        "AdamW": ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
    }[name]
    for g in sd["param_groups"]:
        for k in newer:
            g.pop(k, None)
    return sd


OLD_STYLE = [  # configs an old checkpoint can describe (no option that torch added later)
    (c, i)
    for c, i in zip(CONFIGS, IDS)
    if not any(c[1].get(k) for k in ("nesterov", "amsgrad", "maximize", "decoupled_weight_decay"))
    and (c[0] != "SGD" or c[1].get("momentum"))
]


@pytest.mark.parametrize("step_as", ["float", "int", "int64-tensor", "float16-tensor"])
@pytest.mark.parametrize("name,ctor", [c for c, _ in OLD_STYLE], ids=[i for _, i in OLD_STYLE])
def test_old_checkpoint_with_another_step_form_loads(name, ctor, step_as, device):
    ref, _ = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(13)
    tr = MagnitudeTracker()
    steps([ref], gen, K1, tr)
    old = _make_old_checkpoint(as_default_torch_checkpoint(ref.opt.state_dict()), name, step_as)

    fo = fresh(fused_cls, name, ref, ctor, fused=True)
    fo.opt.load_state_dict(copy.deepcopy(old))
    tref = fresh(torch_cls, name, ref, ctor, fused=False)
    tref.opt.load_state_dict(copy.deepcopy(old))
    # __setstate__ restored the same group keys / defaults as torch's
    for gf, gt in zip(fo.opt.param_groups, tref.opt.param_groups):
        assert set(gf) == set(gt), sorted(set(gf) ^ set(gt))
        for k in gt:
            if k != "params":
                assert gf[k] == gt[k], f"{k}: fusedopt {gf[k]!r} != torch {gt[k]!r} after loading an old checkpoint"
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st and step_as in ("int", "float"):
            assert step_value(st["step"]) == K1  # converted to a tensor on load
    steps([ref, fo], gen, K2, tr)
    assert_pair_close(ref, fo, DT, "resumed from an old-style checkpoint", tracker=tr)
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st:
            assert step_value(st["step"]) == K1 + K2


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_deepcopy_of_optimizer_is_independent_and_identical(name, ctor, device):
    """copy.deepcopy (pickle protocol: __getstate__/__setstate__) gives an optimizer over copied
    params that steps exactly like the original and does not share state with it."""
    _, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(17)
    steps([fo], gen, 3)
    opt2 = copy.deepcopy(fo.opt)
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(params2, fo.params))
    other = Side(opt2, params2)
    steps([fo, other], gen, 4)
    for a, b in zip(fo.params, other.params):
        assert torch.equal(a, b)
    # stepping only the copy must not move the original
    before = [p.detach().clone() for p in fo.params]
    steps([other], gen, 1)
    for a, b in zip(fo.params, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,ctor", CONFIGS, ids=IDS)
def test_load_state_dict_into_an_optimizer_that_already_stepped(name, ctor, device):
    """Loading a checkpoint into an optimizer that has been used (its state and any cached
    per-step bookkeeping already exist) must fully replace them."""
    ref, fo = build_pair(name, group_specs(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(19)
    tr = MagnitudeTracker()
    steps([ref, fo], gen, 3, tr)
    snap_params = [p.detach().clone() for p in ref.params]
    sd = roundtrip(as_default_torch_checkpoint(ref.opt.state_dict()))
    steps([ref, fo], gen, 4, tr)  # both move on ...
    with torch.no_grad():  # ... then both go back to the checkpoint
        for side in (ref, fo):
            for p, v in zip(side.params, snap_params):
                p.copy_(v)
    ref.opt.load_state_dict(copy.deepcopy(sd))
    fo.opt.load_state_dict(copy.deepcopy(sd))
    steps([ref, fo], gen, 5, tr)
    assert_pair_close(ref, fo, DT, "after load_state_dict into a used optimizer", tracker=tr)


def _tiny(cls, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    return model, cls(model.parameters(), **kw)


def _train(model, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, dtype=torch.float64)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_state_dict_hooks_see_and_return_what_torchs_do(name):
    """A state_dict post hook gets the plain dict (torch.save-able with weights_only) and may
    return a dict of its own; a load pre hook may return the dict to load (a custom format), and
    the precision entries are read from that one and put back before the post hooks run."""
    import io

    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1, state_dtype=torch.float32)
    model, opt = _tiny(fused_cls(name), **kw)
    _train(model, opt)
    seen = []

    def post(o, sd):
        seen.append(all(type(v) is dict for v in sd["state"].values()))
        return {"wrapped": sd}

    handle = opt.register_state_dict_post_hook(post)
    ckpt = opt.state_dict()
    handle.remove()
    assert list(ckpt) == ["wrapped"] and seen == [True]
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = _tiny(fused_cls(name), **kw)
    model2.load_state_dict(model.state_dict())
    states_at_post = []
    opt2.register_load_state_dict_pre_hook(lambda o, sd: sd["wrapped"])
    opt2.register_load_state_dict_post_hook(lambda o: states_at_post.append(
        {k: v.dtype for st in o.state.values() for k, v in st.items()}))
    opt2.load_state_dict(ckpt)
    if name == "Adam":  # state_dtype float32 moments on float64 params, as saved
        assert states_at_post[0]["exp_avg"] == torch.float32
    torch.manual_seed(1)
    _train(model, opt)
    torch.manual_seed(1)
    _train(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_optimizer_state_is_one_object_from_construction(name):
    # a wrapper that copies the optimizer's __dict__ (as Lightning's does) keeps seeing its state
    model, opt = _tiny(fused_cls(name), lr=0.1, **(dict(momentum=0.9) if name == "SGD" else {}))
    state = opt.state
    view = type("Wrapper", (), {})()
    view.__dict__ = dict(opt.__dict__)
    _train(model, opt)
    assert opt.state is state and len(state) == 2 and len(view.state) == 2


def test_sgd_buffers_of_a_step_that_raised_are_not_saved():
    """A step that raised (a grad strided unlike its param) made momentum buffers it never wrote: torch
    would have none. They are not in state_dict, a deepcopy or a pickle, so a resumed run's first
    buffer is the grad, as torch's."""
    import pickle

    p = torch.nn.Parameter(torch.zeros(3))
    opt = fused_cls("SGD")([p], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad = torch.ones(6)[::2]
    with pytest.raises(RuntimeError, match="strides"):
        opt.step()
    assert opt.state_dict()["state"] in ({}, {0: {}})
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = twin.param_groups[0]["params"][0]
        q.grad = torch.ones(3)
        twin.step()
        assert torch.equal(twin.state[q]["momentum_buffer"], torch.ones(3))  # the grad, undampened


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
@pytest.mark.parametrize("how", ["to-channels-last-mid-training", "contiguous-checkpoint-into-channels-last"])
def test_a_param_whose_layout_changes_after_its_state_steps_like_torch(name, how):
    """A conv whose params become channels_last once their state exists: the state is copied
    into the param's layout (the kernels walk a param and its state with one index) and the run
    goes on as torch's, which steps any layout elementwise."""
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)

    def conv():
        torch.manual_seed(0)
        return torch.nn.Conv2d(3, 4, 3).double()

    def train(model, opt, seed):
        torch.manual_seed(seed)
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6, dtype=torch.float64)).square().sum().backward()
        opt.step()

    runs = []
    for cls in (fused_cls(name), torch_cls(name)):
        model = conv()
        opt = cls(model.parameters(), **kw)
        train(model, opt, 1)
        if how == "to-channels-last-mid-training":
            model.to(memory_format=torch.channels_last)
        else:
            ckpt = copy.deepcopy(opt.state_dict())
            weights = copy.deepcopy(model.state_dict())
            model = conv().to(memory_format=torch.channels_last)
            model.load_state_dict(weights)
            opt = cls(model.parameters(), **kw)
            opt.load_state_dict(ckpt)
        for seed in (2, 3):
            train(model, opt, seed)
        runs.append((model, opt))
    (fm, fo), (tm, to) = runs
    assert fm.weight.stride() == tm.weight.stride() and fm.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(fm.parameters(), tm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for p in fm.parameters():
        for v in fo.state[p].values():
            if torch.is_tensor(v) and v.dim() == p.dim():
                assert v.stride() == p.stride()
