"""Flat storage (fusedopt.flatten_): params, grads and optimizer state as views of one buffer per
device and dtype, stepped as one tensor per param group.

The oracle is the same training without flat storage: a flat step must be bit-identical to the
unflattened one (the update is elementwise, so merging tensors changes no element's arithmetic),
and both must match torch.optim. Every way a user can take a param or grad out of its flat place
(grad set to None or replaced, data replaced, module.zero_grad, gradient accumulation, a param
that skips steps, load_state_dict) must still train exactly like the unflattened run.
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch

import fusedopt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emulated_cuda import DEVICES  # noqa: E402

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")

OPTIMIZERS = {
    "Adam": (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "AdamW": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "SGD": (fusedopt.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, nesterov=False)),
    "RMSprop": (fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
    "Adagrad": (fusedopt.Adagrad, torch.optim.Adagrad, dict(lr=1e-2)),
}


class Net(torch.nn.Module):
    """Params of several shapes; `unused` gets no gradient unless asked, as a frozen branch."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Linear(6, 10, dtype=dtype)
        self.b = torch.nn.Linear(10, 3, dtype=dtype)
        self.unused = torch.nn.Linear(3, 2, dtype=dtype)

    def forward(self, x, use_all=False):
        y = self.b(torch.tanh(self.a(x)))
        return self.unused(y) if use_all else y


def _nets(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    ref = Net(dtype).to(device)
    return ref, copy.deepcopy(ref)


def _groups(net):
    """Two groups, weights then biases, as flatten_ and the optimizer both take them."""
    return [{"params": [p for n, p in net.named_parameters() if n.endswith("weight")]},
            {"params": [p for n, p in net.named_parameters() if n.endswith("bias")], "lr": 3e-3}]


def _loss(net, x, use_all=False):
    return net(x, use_all).float().square().mean()


def _assert_same(ref_net, net, ref_opt, opt, what):
    for (name, p), q in zip(ref_net.named_parameters(), net.parameters()):
        assert torch.equal(p, q), f"{what}: param {name} differs"
        sp, sq = ref_opt.state.get(p, {}), opt.state.get(q, {})
        assert sp.keys() == sq.keys(), f"{what}: state keys of {name}"
        for key in sp:
            a, b = sp[key], sq[key]
            if torch.is_tensor(a):
                assert torch.equal(a, b), f"{what}: state {key!r} of {name} differs"


def _train(net, opt, gen, steps, use_all=False, dtype=torch.float32):
    device = next(net.parameters()).device
    for _ in range(steps):
        opt.zero_grad()
        _loss(net, torch.randn(8, 6, generator=gen).to(device, dtype), use_all).backward()
        opt.step()


def _flat_slots(opt):
    return [b.step_plan.coalesced_slots() for b in opt._plan.batches if b.step_plan]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("device", DEVICES)
def test_flat_training_is_bit_identical_to_unflattened(name, device):
    """Training with zero_grad() (set_to_none, torch's default) and some params never getting a
    gradient: the flat run equals the plain fusedopt run bit for bit, and torch.optim closely."""
    cls, torch_cls, kw = OPTIMIZERS[name]
    ref, net = _nets(device=device)
    torch_net = copy.deepcopy(ref)
    flat = fusedopt.flatten_(_groups(net))
    assert len(flat) == 1 and len(flat.buckets[0]) == 6
    ref_opt, opt = cls(_groups(ref), **kw), cls(_groups(net), **kw)
    torch_opt = torch_cls(_groups(torch_net), foreach=False, **kw)
    for m, o in ((ref, ref_opt), (net, opt), (torch_net, torch_opt)):
        _train(m, o, torch.Generator().manual_seed(1), steps=4)
    _assert_same(ref, net, ref_opt, opt, name)
    for p, q in zip(torch_net.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert net.unused.weight.grad is None  # no gradient: None, as torch leaves it (and not stepped)
    # the grads that backward made are the flat slots, and the state is flat too
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(g._base is not None for g in grads)
    assert all(v._base is not None for p in opt.state if p.grad is not None
               for v in opt.state[p].values() if torch.is_tensor(v))


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_flat_step_runs_as_one_tensor_per_group(name):
    """On the CPU the plan's table merges every group's adjacent flat params into one slot (the
    weights group and the bias group: two), where the unflattened model has one per param."""
    cls, _, kw = OPTIMIZERS[name]
    ref, net = _nets()
    fusedopt.flatten_(_groups(net))
    ref_opt, opt = cls(_groups(ref), **kw), cls(_groups(net), **kw)
    gen = torch.Generator().manual_seed(2)
    _train(ref, ref_opt, gen, 3, use_all=True)
    _train(net, opt, torch.Generator().manual_seed(2), 3, use_all=True)
    assert _flat_slots(ref_opt) == [6]
    assert _flat_slots(opt) == [2]
    _assert_same(ref, net, ref_opt, opt, name)


def test_params_flattened_after_steps_coalesce_from_the_next_step():
    """A plan built over scattered params finds once that no slots can merge, and stops looking;
    flattening the params later gives them new storage, so the next step validates again and
    merges each group into one slot (SGD without momentum: no state; state made before flatten_
    has its own test below), bit-identical to the plain run."""
    ref, net = _nets()
    ref_opt, opt = fusedopt.SGD(_groups(ref), lr=0.1), fusedopt.SGD(_groups(net), lr=0.1)
    _train(ref, ref_opt, torch.Generator().manual_seed(5), 2, use_all=True)
    _train(net, opt, torch.Generator().manual_seed(5), 2, use_all=True)
    assert _flat_slots(opt) == [6]
    fusedopt.flatten_(_groups(net))
    _train(ref, ref_opt, torch.Generator().manual_seed(6), 2, use_all=True)
    _train(net, opt, torch.Generator().manual_seed(6), 2, use_all=True)
    assert _flat_slots(opt) == [2]
    _assert_same(ref, net, ref_opt, opt, "flattened after 2 steps")


@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["Lion"])
def test_state_made_before_flatten_moves_into_flat_state(name):
    """flatten_ after the optimizer has stepped: the state its steps made (moments, counters,
    momentum buffers) moves into flat state at the next step, which then runs as one slot per
    group, bit-identical to the run that was never flattened (and the state dict keeps each
    param's own shapes). Then flattening again, as a user re-running setup code would, moves it
    into the new buckets' state."""
    cls, _, kw = OPTIMIZERS[name] if name in OPTIMIZERS else (fusedopt.Lion, None, dict(lr=1e-3))
    ref, net = _nets()
    ref_opt, opt = cls(_groups(ref), **kw), cls(_groups(net), **kw)
    for m, o in ((ref, ref_opt), (net, opt)):
        _train(m, o, torch.Generator().manual_seed(7), 2, use_all=True)
    assert _flat_slots(opt) == [6]
    old = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]  # kept alive
    for round_ in range(2):
        fusedopt.flatten_(_groups(net))
        for m, o in ((ref, ref_opt), (net, opt)):
            _train(m, o, torch.Generator().manual_seed(8 + round_), 2, use_all=True)
        assert _flat_slots(opt) == [2], round_
        _assert_same(ref, net, ref_opt, opt, f"{name}, flattened after steps, round {round_}")
    moved = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    assert moved and all(v._base is not None and all(v is not o for o in old) for v in moved)
    for (key, a), b in zip(ref_opt.state_dict()["state"].items(), opt.state_dict()["state"].values()):
        for k in a:
            if torch.is_tensor(a[k]):
                assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (key, k)


@pytest.mark.parametrize("how", ["optimizer", "buckets"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_grad_given_other_data_is_the_users_and_its_flat_grad_comes_back(how, set_to_none):
    """`p.grad.data = other` re-points the tensor that was the param's flat grad. zero_grad (the
    optimizer's or the buckets') then treats that tensor as torch does, zeroing it or setting the
    grad to None, and with set_to_none the next backward accumulates into a new view of the flat
    buffer: training equals the unflattened run, which does the same. A strided replacement is
    refused by the step, as unflattened; zero_grad(set_to_none=True) then recovers."""
    ref, net = _nets()
    flat = fusedopt.flatten_(_groups(net))
    ref_opt, opt = fusedopt.Adam(_groups(ref), lr=1e-2), fusedopt.Adam(_groups(net), lr=1e-2)
    zero = {id(opt): flat.zero_grad if how == "buckets" else opt.zero_grad, id(ref_opt): ref_opt.zero_grad}
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        x = torch.randn(8, 6, generator=gen)
        errors = []
        for m, o in ((ref, ref_opt), (net, opt)):
            zero[id(o)](set_to_none=set_to_none)
            _loss(m, x, use_all=True).backward()
            if step == 1:
                w = m.a.weight
                w.grad.data = w.grad.data * 2  # a new tensor: the flat grad's slot is the user's now
            if step == 2:
                w = m.b.weight
                w.grad.data = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))[::2, ::2]
            try:
                o.step()
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        assert errors[0] == errors[1], step
        assert (errors[0] is not None) == (step == 2), (step, errors[0])
        if step == 2:
            assert "strides" in errors[0]
            for m, o in ((ref, ref_opt), (net, opt)):  # torch's way out: fresh grads
                zero[id(o)](set_to_none=True)
                _loss(m, x, use_all=True).backward()
                o.step()
        _assert_same(ref, net, ref_opt, opt, f"step {step}")
    old = net.a.weight.grad
    zero[id(opt)](set_to_none=set_to_none)
    if not set_to_none:
        assert net.a.weight.grad is old and not old.any()  # the user's tensor, zeroed as torch does
    else:
        assert net.a.weight.grad is None
        _loss(net, torch.randn(8, 6), use_all=True).backward()
        assert all(p.grad._base is not None for p in net.parameters())  # flat views again


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_autograd_grad_leaves_flat_params_grads_alone(name):
    """torch.autograd.grad runs the params' hooks too but accumulates nothing: after
    zero_grad(set_to_none=True) the grads stay None and the step skips those params, as torch's
    does. backward(inputs=...) gives only its inputs grads, as flat views."""
    cls, torch_cls, kw = OPTIMIZERS[name]
    ref, net = _nets()
    fusedopt.flatten_(_groups(net))
    ref_opt, opt = torch_cls(_groups(ref), foreach=False, **kw), cls(_groups(net), **kw)
    x = torch.randn(8, 6)
    for m, o in ((ref, ref_opt), (net, opt)):
        _loss(m, x, use_all=True).backward()
        o.step()
        o.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(_loss(m, x, use_all=True), list(m.parameters()))
        assert all(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in m.parameters())
        o.step()  # no grads: nothing moves (Adam's momentum would, were they zeros)
        _loss(m, x, use_all=True).backward(inputs=[m.a.weight, m.b.bias])
        assert [p.grad is not None for p in m.parameters()] == [True, False, False, True, False, False]
        o.step()
    assert net.a.weight.grad._base is not None and net.b.bias.grad._base is not None
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.emulated_cuda
def test_emul_flat_sgd_launches_one_tensor_per_group(emulated_cuda_module):
    """The CUDA path coalesces too (emulated kernels): SGD, whose slots have no device step
    counter, launches one tensor per group; Adam keeps one per param there (its counters are
    device memory the host does not read) and still steps exactly like the plain run."""
    for name, want in (("SGD", 2), ("Adam", 6)):
        cls, _, kw = OPTIMIZERS[name]
        ref, net = _nets()
        fusedopt.flatten_(_groups(net))
        ref_opt, opt = cls(_groups(ref), **kw), cls(_groups(net), **kw)
        _train(ref, ref_opt, torch.Generator().manual_seed(3), 3, use_all=True)
        _train(net, opt, torch.Generator().manual_seed(3), 3, use_all=True)
        assert emulated_cuda_module.last_launch_tensors() == want, name
        _assert_same(ref, net, ref_opt, opt, name)


def test_flatten_keeps_params_values_identity_and_grads():
    ref, net = _nets()
    ps = list(net.parameters())
    _loss(net, torch.randn(4, 6), use_all=True).backward()
    grads = [p.grad.clone() for p in ps]
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    flat = fusedopt.flatten_(net)
    assert list(net.parameters()) == ps  # same objects
    for (k, v), p, g in zip(sd.items(), ps, grads):
        assert torch.equal(net.state_dict()[k], v) and net.state_dict()[k].shape == v.shape
        assert torch.equal(p.grad, g)
    buf = flat.buckets[0]
    assert buf.numel == sum(p.numel() for p in ps)
    ptrs = [p.data_ptr() for p in ps]
    assert all(b - a == p.numel() * 4 for a, b, p in zip(ptrs, ptrs[1:], ps))
    net.load_state_dict(sd)  # copies in place: still flat
    assert [p.data_ptr() for p in ps] == ptrs


def test_flatten_makes_a_bucket_per_dtype():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, dtype=torch.bfloat16)),
          torch.nn.Parameter(torch.randn(4))]
    flat = fusedopt.flatten_(ps)
    assert [(b.dtype, len(b)) for b in flat] == [(torch.float32, 2), (torch.bfloat16, 1)]
    assert ps[2].data_ptr() - ps[0].data_ptr() == 3 * 4


def _flat_and_plain(name="Adam", steps=2):
    cls, _, kw = OPTIMIZERS[name]
    ref, net = _nets()
    fusedopt.flatten_(net)
    ref_opt, opt = cls(ref.parameters(), **kw), cls(net.parameters(), **kw)
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    _train(ref, ref_opt, gen_a, steps, use_all=True)
    _train(net, opt, gen_b, steps, use_all=True)
    return ref, net, ref_opt, opt, gen_a, gen_b


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_zero_grad_without_set_to_none_keeps_the_flat_grads(name):
    ref, net, ref_opt, opt, ga, gb = _flat_and_plain(name)
    slots = [p.grad for p in net.parameters()]
    opt.zero_grad(set_to_none=False)
    ref_opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(net.parameters(), slots))
    for _ in range(3):  # gradient accumulation: two backwards per step
        for m, o, g in ((ref, ref_opt, ga), (net, opt, gb)):
            o.zero_grad(set_to_none=False)
            for _ in range(2):
                _loss(m, torch.randn(8, 6, generator=g), use_all=True).backward()
            o.step()
    assert all(p.grad is g for p, g in zip(net.parameters(), slots))
    _assert_same(ref, net, ref_opt, opt, name)


@pytest.mark.parametrize("edit", ["grad_none", "grad_replaced", "module_zero_grad", "data_replaced",
                                  "skipped_step"])
def test_params_leaving_their_flat_place_still_train_like_torch(edit):
    """A grad set to None or replaced by hand, nn.Module.zero_grad (no memset), a param given new
    data, a param that skips a step (its step count falls behind its neighbours'): the flat run
    stays bit-identical to the plain one."""
    ref, net, ref_opt, opt, ga, gb = _flat_and_plain("Adam")
    for step in range(3):
        for m, o, g in ((ref, ref_opt, ga), (net, opt, gb)):
            if edit == "module_zero_grad":
                m.zero_grad()
            else:
                o.zero_grad(set_to_none=False)
            x = torch.randn(8, 6, generator=g)
            _loss(m, x, use_all=not (edit == "skipped_step" and step == 0)).backward()
            if edit == "skipped_step" and step == 0:
                m.unused.weight.grad = m.unused.bias.grad = None
            if edit == "grad_none" and step == 1:
                m.a.weight.grad = None
            if edit == "grad_replaced":
                m.b.weight.grad = m.b.weight.grad.clone() * 2
            if edit == "data_replaced" and step == 1:
                with torch.no_grad():
                    m.a.bias.data = m.a.bias.data.clone() + 1
            o.step()
        _assert_same(ref, net, ref_opt, opt, f"{edit}, step {step}")
    if edit == "data_replaced":  # no longer in its bucket: backward gives it a grad of its own
        opt.zero_grad()
        _loss(net, torch.randn(8, 6, generator=gb)).backward()
        assert net.a.bias.grad._base is None and net.a.weight.grad._base is not None


def test_unequal_step_counts_are_not_merged():
    """After a step where one param had no grad its counter is one behind: the plan must not run
    it with its neighbours' step (bias corrections differ)."""
    ref, net, ref_opt, opt, ga, gb = _flat_and_plain("Adam", steps=0)
    for step in range(3):
        for m, o, g in ((ref, ref_opt, ga), (net, opt, gb)):
            o.zero_grad()
            _loss(m, torch.randn(8, 6, generator=g), use_all=step > 0).backward()
            o.step()
    steps = [opt.state[p]["step"].item() for p in net.parameters()]
    assert steps == [3.0] * 4 + [2.0] * 2
    assert _flat_slots(opt) == [2]
    _assert_same(ref, net, ref_opt, opt, "unequal steps")


def test_state_dict_and_load_state_dict_with_flat_storage():
    """state_dict holds each param's state in its own shape; it saves, loads (weights_only) into a
    fresh flat optimizer and into torch.optim, and a torch.optim state loads into a flat one."""
    ref, net, ref_opt, opt, ga, gb = _flat_and_plain("Adam", steps=3)
    sd = opt.state_dict()
    for p, st in zip(net.parameters(), sd["state"].values()):
        assert st["exp_avg"].shape == p.shape and st["step"].shape == ()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    net2 = copy.deepcopy(net)
    fusedopt.flatten_(net2)
    opt2 = fusedopt.Adam(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded)
    torch_opt = torch.optim.Adam(copy.deepcopy(ref).parameters(), lr=1e-2)
    torch_opt.load_state_dict(ref_opt.state_dict())
    ref_opt.load_state_dict(torch_opt.state_dict())
    for m, o, g in ((ref, ref_opt, ga), (net2, opt2, gb)):
        _train(m, o, g, 3, use_all=True)
    _assert_same(ref, net2, ref_opt, opt2, "after load_state_dict")
    assert _flat_slots(opt2) == [1]


def test_an_optimizer_zeroes_only_its_own_params():
    """Two optimizers over one flat bucket: zero_grad of one leaves the other's grads alone."""
    ref, net = _nets()
    fusedopt.flatten_(net)
    first, second = list(net.a.parameters()), list(net.b.parameters()) + list(net.unused.parameters())
    opt_a = fusedopt.SGD(first, lr=0.1)
    _loss(net, torch.randn(4, 6), use_all=True).backward()
    kept = [p.grad.clone() for p in second]
    opt_a.zero_grad()
    assert all(p.grad is None for p in first)
    assert all(torch.equal(p.grad, k) for p, k in zip(second, kept))


def test_flatten_again_moves_params_to_a_new_bucket():
    ref, net, ref_opt, opt, ga, gb = _flat_and_plain("Adam", steps=2)
    fusedopt.flatten_(net)
    for m, o, g in ((ref, ref_opt, ga), (net, opt, gb)):
        _train(m, o, g, 2, use_all=True)
    _assert_same(ref, net, ref_opt, opt, "flattened twice")
    assert _flat_slots(opt) == [1]


@pytest.mark.parametrize("bad, message", [
    (lambda: [torch.nn.Parameter(torch.randn(3, 4).t())], "not contiguous"),
    (lambda: [torch.randn(3, requires_grad=True) * 2], "not a leaf"),
    (lambda: [torch.zeros(3, dtype=torch.int64)], "torch.int64"),
    (lambda: torch.nn.Parameter(torch.randn(3)), "single tensor"),
    (lambda: [3.0], "not a tensor"),
])
def test_flatten_rejects_what_it_cannot_flatten(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fusedopt.flatten_(bad())


def test_flatten_rejects_duplicates_and_shared_memory():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
        fusedopt.flatten_([p, p])
    base = torch.randn(8)
    a, b = torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:])
    with pytest.raises(ValueError, match="shares memory"):
        fusedopt.flatten_([a, b])
