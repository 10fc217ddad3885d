"""What each gloo process of tests/distributed runs (started by dist_harness, CPU, 2 ranks).

The oracle is torch.optim. FSDP2, DDP and ZeRO runs are compared with one single-process
torch.optim run (``foreach=False``) of the same net on the whole global batch, which every rank
computes for itself: each rank feeds its half of the batch and the mean-squared-error loss is a
mean, so the averaged grads of the distributed run are the single-process grads up to rounding.

Tolerance (float32): 1e-5 absolute and relative on params and optimizer states after 5 steps.
The two runs differ only by rounding: the grads by the order of the reduction (a few ulp, ~1e-7
relative), the updates by the order of the fused kernel's arithmetic against torch's for-loop
(also a few ulp). Adam normalises the update, so a relative grad error of 1e-7 moves an update
of size lr by ~1e-7 * lr; over 5 steps of lr <= 0.05 that stays three orders of magnitude under
1e-5, while any real mistake (a wrong shard, a missed step, a skipped state) moves params by
~lr = 1e-2. Restarts from a distributed checkpoint are compared bitwise: the same code on the
same data must give the same bits.
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import fusedopt

ATOL = RTOL = 1e-5
STEPS = 5
GLOBAL_BATCH = 8


@dataclasses.dataclass
class Context:
    rank: int
    world_size: int
    tmpdir: str


SCENARIOS: dict = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# -- the net, its data, training ------------------------------------------------------------------


class Net(nn.Module):
    """Sharded over 2 ranks by rows: fc1 has 7 (4 + 3), fc2 3 (2 + 1), and ``gain`` 1 row, so
    rank 1's local shard of ``gain`` is empty."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)
        self.gain = nn.Parameter(torch.ones(1, 3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.gain


def make_net(seed: int = 0) -> Net:
    net = Net()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net


def fsdp_net(seed: int = 0, mesh=None) -> Net:
    net = make_net(seed)
    fully_shard(net.fc1, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def groups(net: Net, lr: float) -> list[dict]:
    """Two param groups, the second with half the lr: group boundaries must survive too."""
    return [{"params": [net.fc1.weight, net.fc1.bias]},
            {"params": [net.fc2.weight, net.fc2.bias, net.gain], "lr": lr / 2}]


def batch(t: int, ctx: Context | None):
    """Step ``t``'s global batch (fresh random data each step), or this rank's half of it."""
    gen = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 3, generator=gen)
    if ctx is None:
        return x, y
    per = GLOBAL_BATCH // ctx.world_size
    return x[ctx.rank * per:(ctx.rank + 1) * per], y[ctx.rank * per:(ctx.rank + 1) * per]


def train(model, opt, ctx: Context | None, start: int, steps: int, scaler=None, inf_at=()):
    for t in range(start, start + steps):
        x, y = batch(t, ctx)
        loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if t in inf_at and ctx.rank == 1:  # only one rank sees it: the skip must be agreed
                model.fc1.weight.grad._local_tensor.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def reference(cls_name: str, kw: dict, steps: int = STEPS, start: int = 0, net: Net | None = None):
    """The single-process torch.optim run on the global batch."""
    net = net or make_net()
    opt = getattr(torch.optim, cls_name)(groups(net, kw["lr"]), foreach=False, **kw)
    train(net, opt, None, start, steps)
    return net, opt


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_matches_reference(net, opt, ref, ref_opt, what: str) -> None:
    """Params and optimizer state equal the single-process run; DTensor state is laid out like
    its param and the step counter is a plain tensor, as with torch.optim."""
    init = make_net()
    for (name, p), q, p0 in zip(net.named_parameters(), ref.parameters(), init.parameters()):
        got = full(p.detach())
        torch.testing.assert_close(got, q.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {name}: {m}")
        assert not torch.allclose(got, p0.detach(), atol=1e-3), f"{what} {name}: never updated"
        st, ref_st = opt.state[p], ref_opt.state[q]
        assert st.keys() == ref_st.keys(), f"{what} {name}: state keys {sorted(st)} != {sorted(ref_st)}"
        for key, ref_v in ref_st.items():
            v = st[key]
            if key == "step":
                assert type(v) is torch.Tensor and float(v) == float(ref_v), f"{what} {name}: step {v!r}"
                continue
            if isinstance(p, DTensor):
                assert isinstance(v, DTensor), f"{what} {name}: state {key} is a {type(v).__name__}"
                assert (v.device_mesh, v.placements, v.shape, v.stride()) == (
                    p.device_mesh, p.placements, p.shape, p.stride()), f"{what} {name}: state {key} layout"
            torch.testing.assert_close(full(v), ref_v, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {name} {key}: {m}")


def local_snapshot(net, opt) -> list:
    """Every local param and state tensor, cloned (what a bitwise comparison compares)."""
    out = []
    for p in net.parameters():
        st = {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in opt.state[p].items()}
        out.append(((p.to_local() if isinstance(p, DTensor) else p).detach().clone(), st))
    return out


def assert_bitwise(a: list, b: list, what: str) -> None:
    assert len(a) == len(b)
    for i, ((pa, sa), (pb, sb)) in enumerate(zip(a, b)):
        assert torch.equal(pa, pb), f"{what}: param {i} differs"
        assert sa.keys() == sb.keys(), f"{what}: param {i} state keys"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: param {i} state {k} differs"


CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)),
    ("Adam", dict(lr=0.02, amsgrad=True, weight_decay=0.05)),
    ("AdamW", dict(lr=0.02, weight_decay=0.1)),
]


# -- FSDP2 ------------------------------------------------------------------------------------------


@scenario
def fsdp2_matches_torch(ctx: Context) -> None:
    for cls_name, kw in CASES:
        net = fsdp_net()
        assert all(isinstance(p, DTensor) for p in net.parameters())
        opt = getattr(fusedopt, cls_name)(groups(net, kw["lr"]), **kw)
        train(net, opt, ctx, 0, STEPS)
        ref, ref_opt = reference(cls_name, kw)
        assert_matches_reference(net, opt, ref, ref_opt, f"FSDP2 {cls_name}{kw}")


@scenario
def hsdp_2d_mesh_matches_torch(ctx: Context) -> None:
    """A 2-D mesh (replicate x shard): placements (Replicate(), Shard(0))."""
    mesh = init_device_mesh("cpu", (1, ctx.world_size), mesh_dim_names=("replicate", "shard"))
    kw = dict(lr=0.02, weight_decay=0.1)
    net = fsdp_net(mesh=mesh)
    assert net.fc1.weight.placements == (Replicate(), Shard(0))
    opt = fusedopt.AdamW(groups(net, kw["lr"]), **kw)
    train(net, opt, ctx, 0, STEPS)
    ref, ref_opt = reference("AdamW", kw)
    assert_matches_reference(net, opt, ref, ref_opt, "HSDP AdamW")


@scenario
def replicate_placement_matches_torch(ctx: Context) -> None:
    """DTensor params with Replicate placement (as tensor parallelism leaves norms and biases):
    fusedopt against torch.optim's for-loop and foreach on the same DTensors."""
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    shapes = [(6, 4), (4,), (1, 3)]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    runs = {}
    for impl in ("fusedopt", "forloop", "foreach"):
        ps = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Replicate()])) for t in init]
        if impl == "fusedopt":
            opt = fusedopt.Adam(ps, lr=0.02, weight_decay=0.05)
        else:
            opt = torch.optim.Adam(ps, lr=0.02, weight_decay=0.05, foreach=impl == "foreach")
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = distribute_tensor(gi, mesh, [Replicate()])
            opt.step()
        runs[impl] = (ps, opt)
    ps, opt = runs["fusedopt"]
    for impl in ("forloop", "foreach"):
        ref_ps, ref_opt = runs[impl]
        for i, (p, q) in enumerate(zip(ps, ref_ps)):
            assert p.placements == (Replicate(),)
            torch.testing.assert_close(p.to_local(), q.to_local(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{impl} {i}: {m}")
            assert not torch.allclose(p.to_local(), init[i], atol=1e-3)
            for k in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][k].placements == (Replicate(),)
                torch.testing.assert_close(opt.state[p][k].to_local(), ref_opt.state[q][k].to_local(),
                                           atol=ATOL, rtol=RTOL)


@scenario
def fsdp2_empty_local_shard_advances_steps(ctx: Context) -> None:
    """``gain`` has one row: rank 1 holds none of it, and still counts every step (step
    counters that differ between ranks would make a checkpoint inconsistent and the bias
    correction diverge once the shards are redistributed)."""
    for cls_name, kw in (("AdamW", dict(lr=0.02)), ("Adam", dict(lr=0.02, amsgrad=True)),
                         ("SGD", dict(lr=0.05, momentum=0.9))):
        net = fsdp_net()
        opt = getattr(fusedopt, cls_name)(groups(net, kw["lr"]), **kw)
        train(net, opt, ctx, 0, 3)
        local = net.gain.to_local()
        assert local.numel() == (0 if ctx.rank == 1 else 3), tuple(local.shape)
        st = opt.state[net.gain]
        if cls_name == "SGD":
            assert st["momentum_buffer"].to_local().shape == local.shape
        else:
            counts = [float(opt.state[p]["step"]) for p in net.parameters()]
            assert counts == [3.0] * len(counts), f"rank {ctx.rank}: step counters {counts}"
            every = [None] * ctx.world_size
            dist.all_gather_object(every, counts)
            assert every[0] == every[1]
        ref, ref_opt = reference(cls_name, kw, steps=3)
        ref_gain = ref.gain.detach()
        torch.testing.assert_close(net.gain.full_tensor(), ref_gain, atol=ATOL, rtol=RTOL)


@scenario
def fsdp2_grad_scaler_agrees_to_skip(ctx: Context) -> None:
    """GradScaler under FSDP2: an inf in one rank's local grad makes every rank skip the step
    (DTensor's unscale all-reduces found_inf); fusedopt must match torch.optim doing the same.
    Skipping the first step matters for SGD: its momentum buffers must not exist after it, and
    the first real step must start them from the grad (dampening makes that visible). fusedopt's
    Adam may keep the state it made for a skipped first step, zeros at step 0: the same update."""
    for cls_name, kw in (("AdamW", dict(lr=0.02, weight_decay=0.1)),
                         ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3))):
        runs = []
        for mod in (fusedopt, torch.optim):
            net = fsdp_net()
            opt = getattr(mod, cls_name)(net.parameters(), **kw)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            train(net, opt, ctx, 0, 1, scaler=scaler, inf_at=(0,))
            for st in opt.state.values():  # none, or (fusedopt's Adam) zeros at step 0
                assert "momentum_buffer" not in st, f"{mod.__name__}.{cls_name}: a skipped first step made a buffer"
                assert float(st.get("step", 0)) == 0 and not any(
                    v.to_local().any() for k, v in st.items() if k != "step"), f"{mod.__name__}.{cls_name}: {st}"
            train(net, opt, ctx, 1, STEPS - 1, scaler=scaler, inf_at=(3,))
            runs.append((net, opt, scaler.get_scale()))
        (net, opt, scale), (ref, ref_opt, ref_scale) = runs
        assert scale == ref_scale == 2.0 ** 10 * 0.5 ** 2
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.to_local(), q.to_local(), atol=ATOL, rtol=RTOL)
            assert opt.state[p].keys() == ref_opt.state[q].keys()
            for k, v in ref_opt.state[q].items():
                if k == "step":
                    assert float(opt.state[p][k]) == float(v) == STEPS - 2
                else:
                    torch.testing.assert_close(opt.state[p][k].to_local(), v.to_local(), atol=ATOL, rtol=RTOL)


@scenario
def fsdp2_in_kernel_schedule(ctx: Context) -> None:
    kw = dict(lr=0.05, weight_decay=0.1)
    net = fsdp_net()
    opt = fusedopt.AdamW(groups(net, kw["lr"]), **kw)
    sched = fusedopt.lr_scheduler.in_kernel(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS))
    ref = make_net()
    ref_opt = torch.optim.AdamW(groups(ref, kw["lr"]), foreach=False, **kw)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=STEPS)
    for t in range(STEPS):
        train(net, opt, ctx, t, 1)
        sched.step()
        train(ref, ref_opt, None, t, 1)
        ref_sched.step()
    assert opt.lr_schedule_mode == "in-kernel"
    assert_matches_reference(net, opt, ref, ref_opt, "FSDP2 AdamW + in-kernel cosine")
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12, abs=1e-15)


# -- distributed checkpoints --------------------------------------------------------------------------


def _save(net, opt, path: str) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _load(net, opt, path: str) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


@scenario
def dcp_resume_is_bitwise(ctx: Context) -> None:
    """Save after 3 steps, train on to 6; a fresh net + optimizer (other init) loads the
    checkpoint and trains to 6: the same bits."""
    for cls_name, kw in (("AdamW", dict(lr=0.02, weight_decay=0.1)), ("Adam", dict(lr=0.02, amsgrad=True)),
                         ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True))):
        path = os.path.join(ctx.tmpdir, f"resume-{cls_name}")
        net = fsdp_net()
        opt = getattr(fusedopt, cls_name)(groups(net, kw["lr"]), **kw)
        train(net, opt, ctx, 0, 3)
        _save(net, opt, path)
        saved = local_snapshot(net, opt)
        train(net, opt, ctx, 3, 3)
        fresh = fsdp_net(seed=1)
        fresh_opt = getattr(fusedopt, cls_name)(groups(fresh, kw["lr"]), **kw)
        _load(fresh, fresh_opt, path)
        assert_bitwise(local_snapshot(fresh, fresh_opt), saved, f"{cls_name} right after loading")
        for p in fresh_opt.state.values():  # the state is DTensor again, step a plain tensor
            assert all(isinstance(v, DTensor) for k, v in p.items() if k != "step")
            assert "step" not in p or type(p["step"]) is torch.Tensor
        train(fresh, fresh_opt, ctx, 3, 3)
        assert_bitwise(local_snapshot(fresh, fresh_opt), local_snapshot(net, opt), f"{cls_name} resumed")


def _cross(ctx: Context, save_cls, load_cls, tag: str) -> None:
    """A checkpoint written with one implementation loads into the other and trains on."""
    kw = dict(lr=0.02, weight_decay=0.1)
    path = os.path.join(ctx.tmpdir, f"cross-{tag}")
    net = fsdp_net()
    opt = save_cls(groups(net, kw["lr"]), **kw)
    train(net, opt, ctx, 0, 3)
    _save(net, opt, path)
    saved = local_snapshot(net, opt)
    train(net, opt, ctx, 3, 3)
    fresh = fsdp_net(seed=1)
    fresh_opt = load_cls(groups(fresh, kw["lr"]), **kw)
    _load(fresh, fresh_opt, path)
    assert_bitwise(local_snapshot(fresh, fresh_opt), saved, f"{tag} right after loading")
    train(fresh, fresh_opt, ctx, 3, 3)
    for p, q in zip(fresh.parameters(), net.parameters()):
        torch.testing.assert_close(p.to_local(), q.to_local(), atol=ATOL, rtol=RTOL)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fresh_opt.state[p][k].to_local(), opt.state[q][k].to_local(),
                                       atol=ATOL, rtol=RTOL)
        assert float(fresh_opt.state[p]["step"]) == float(opt.state[q]["step"]) == 6
    # and the optimizer state dict DCP sees has the same layout as torch.optim's
    osd = get_optimizer_state_dict(fresh, fresh_opt)
    for fqn, st in osd["state"].items():
        assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"], (fqn, sorted(st))
        assert isinstance(st["exp_avg"], DTensor) and not isinstance(st["step"], DTensor)


@scenario
def dcp_torch_checkpoint_into_fusedopt(ctx: Context) -> None:
    _cross(ctx, torch.optim.AdamW, fusedopt.AdamW, "torch-to-fusedopt")


@scenario
def dcp_fusedopt_checkpoint_into_torch(ctx: Context) -> None:
    _cross(ctx, fusedopt.AdamW, torch.optim.AdamW, "fusedopt-to-torch")


# -- DDP and ZeRO ------------------------------------------------------------------------------------


def _ddp(ctx: Context, bucket_view: bool) -> None:
    for cls_name, kw in CASES:
        net = make_net()
        model = DDP(net, gradient_as_bucket_view=bucket_view)
        opt = getattr(fusedopt, cls_name)(groups(net, kw["lr"]), **kw)
        if bucket_view:  # the grads really are views into DDP's flat buckets
            x, y = batch(0, ctx)
            F.mse_loss(model(x), y).backward()
            ptrs = {p.grad.untyped_storage().data_ptr() for p in net.parameters()}
            assert len(ptrs) == 1, "expected every grad to be a view of one bucket"
            opt.zero_grad()
        train(model, opt, ctx, 0, STEPS)
        ref, ref_opt = reference(cls_name, kw)
        assert_matches_reference(net, opt, ref, ref_opt, f"DDP(bucket_view={bucket_view}) {cls_name}{kw}")


@scenario
def ddp_matches_torch(ctx: Context) -> None:
    _ddp(ctx, bucket_view=False)


@scenario
def ddp_bucket_view_matches_torch(ctx: Context) -> None:
    _ddp(ctx, bucket_view=True)


@scenario
def zero_matches_torch(ctx: Context) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=fusedopt.X): each rank steps its partition with
    a fusedopt optimizer, then the ranks broadcast their params."""
    for cls_name, kw in (("AdamW", dict(lr=0.02, weight_decay=0.1)), ("Adam", dict(lr=0.02, amsgrad=True)),
                         ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True))):
        net = make_net()
        model = DDP(net)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=getattr(fusedopt, cls_name), **kw)
        assert type(opt.optim) is getattr(fusedopt, cls_name)
        mine = sum(len(g["params"]) for g in opt.optim.param_groups)
        assert 0 < mine < len(list(net.parameters())), "expected each rank to own a strict part"
        train(model, opt, ctx, 0, STEPS)
        ref = make_net()
        ref_opt = getattr(torch.optim, cls_name)(ref.parameters(), foreach=False, **kw)
        train(ref, ref_opt, None, 0, STEPS)
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"ZeRO {cls_name} {name}: {m}")
        for p in opt.optim.param_groups[0]["params"]:  # the state this rank owns
            q = dict(zip(map(id, net.parameters()), ref.parameters()))[id(p)]
            for k, v in ref_opt.state[q].items():
                torch.testing.assert_close(opt.optim.state[p][k], v, atol=ATOL, rtol=RTOL)
        opt.consolidate_state_dict(to=0)
        if ctx.rank == 0:  # the consolidated state_dict has every param's state, in torch's layout
            sd = opt.state_dict()
            assert sorted(sd["state"]) == list(range(len(list(net.parameters()))))


# -- bad input ------------------------------------------------------------------------------------------


@scenario
def bad_grad_placements(ctx: Context) -> None:
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    gen = torch.Generator().manual_seed(3)
    msg = re.escape("param_groups[0]['params'][1] is a DTensor with placements (Shard(dim=0),) "
                    "but its grad has (Replicate(),)")
    for cls in (fusedopt.AdamW, fusedopt.SGD):
        ps = [nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)])) for _ in range(2)]
        good = [distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)]) for _ in ps]
        opt = cls(ps, lr=0.1, momentum=0.9) if cls is fusedopt.SGD else cls(ps, lr=0.1)
        ps[0].grad = good[0]
        ps[1].grad = distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Replicate()])
        before = [p.to_local().clone() for p in ps]
        with pytest.raises(RuntimeError, match=rf"fusedopt\.{cls.__name__}: {msg}"):
            opt.step()  # found when the plan is built
        assert all(torch.equal(p.to_local(), b) for p, b in zip(ps, before)), "a refused step changed params"
        ps[1].grad = good[1]
        opt.step()
        ps[1].grad = distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Replicate()])
        with pytest.raises(RuntimeError, match=msg):
            opt.step()  # found by the cached plan's per-step check
        # a state tensor laid out unlike its param (e.g. written by hand)
        ps[1].grad = good[1]
        key = "momentum_buffer" if cls is fusedopt.SGD else "exp_avg"
        opt.state[ps[0]][key] = opt.state[ps[0]][key].redistribute(placements=[Replicate()])
        with pytest.raises(RuntimeError, match=re.escape(
                f"param_groups[0]['params'][0] is a DTensor with placements (Shard(dim=0),) but "
                f"its state '{key}' has (Replicate(),)")):
            opt.step()


@scenario
def bad_plain_tensor_next_to_dtensor(ctx: Context) -> None:
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    d = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    d.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    plain = nn.Parameter(torch.ones(3))
    plain.grad = torch.ones(3)
    for cls in (fusedopt.Adam, fusedopt.SGD):
        opt = cls([{"params": [d]}, {"params": [plain]}], lr=0.1)
        with pytest.raises(RuntimeError, match=re.escape(
                f"fusedopt.{cls.__name__}: param_groups[1]['params'][0] is a plain tensor but "
                "param_groups[0]['params'][0] is a DTensor")):
            opt.step()
    # a Partial param: each rank holds a term of a sum, which an elementwise update cannot step
    part = nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, [Partial()]))
    part.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
    with pytest.raises(RuntimeError, match=re.escape(
            "fusedopt.AdamW: param_groups[0]['params'][0] is a DTensor with placements (Partial(sum),); "
            "fusedopt steps Shard and Replicate placements, not Partial ones")):
        fusedopt.AdamW([part]).step()
    # a plain grad on a DTensor param
    e = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    opt = fusedopt.AdamW([e])
    try:
        e.grad = torch.ones(4, 3)
    except RuntimeError:
        return  # this torch refuses the assignment itself
    with pytest.raises(RuntimeError, match=re.escape("param_groups[0]['params'][0] is a DTensor but its grad is a Tensor")):
        opt.step()


@scenario
def fsdp2_local_tensors_replaced(ctx: Context) -> None:
    """``module.to(...)`` on an FSDP2 module gives each param a new local tensor (here, after a
    round trip through float64, in new memory): the next step must update the new ones, as
    torch.optim does, which reads them every step. A state tensor replaced by hand is honoured
    too, as for plain params. The cached plan notices both by identity."""
    kw = dict(lr=0.02, weight_decay=0.1)
    net = fsdp_net()
    opt = fusedopt.AdamW(groups(net, kw["lr"]), **kw)
    ref = make_net()
    ref_opt = torch.optim.AdamW(groups(ref, kw["lr"]), foreach=False, **kw)
    train(net, opt, ctx, 0, 2)
    train(ref, ref_opt, None, 0, 2)
    before = [p.to_local().data_ptr() for p in net.parameters() if p.to_local().numel()]
    for m in (net, ref):
        m.double()
        m.float()
    after = [p.to_local().data_ptr() for p in net.parameters() if p.to_local().numel()]
    assert not set(before) & set(after), "expected FSDP2 to move every shard to new memory"
    train(net, opt, ctx, 2, 1)
    train(ref, ref_opt, None, 2, 1)
    for p, q in zip(net.parameters(), ref.parameters()):  # one step later, so each is seen alone
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"] * 0.5
        ref_opt.state[q]["exp_avg"] = ref_opt.state[q]["exp_avg"] * 0.5
    train(net, opt, ctx, 3, 2)
    train(ref, ref_opt, None, 3, 2)
    assert_matches_reference(net, opt, ref, ref_opt, "FSDP2 AdamW, shards and a state replaced")


@scenario
def fsdp2_grads_read_in_cpp(ctx: Context) -> None:
    """The eager entry reads the local grads from the DTensor grads in C++; binding them to the
    local params in Python (the slower path, kept for layouts it must check and name) is not
    taken in an ordinary FSDP2 step, and the results are torch's."""
    from fusedopt.optim import _fused

    kw = dict(lr=0.02, weight_decay=0.1)
    net = fsdp_net()
    opt = fusedopt.AdamW(groups(net, kw["lr"]), **kw)
    ref = make_net()
    ref_opt = torch.optim.AdamW(groups(ref, kw["lr"]), foreach=False, **kw)
    bound = []
    original = _fused.FusedStepMixin._bind_local_grads
    _fused.FusedStepMixin._bind_local_grads = lambda self, batch: bound.append(1) or original(self, batch)
    try:
        train(net, opt, ctx, 0, STEPS)
    finally:
        _fused.FusedStepMixin._bind_local_grads = original
    train(ref, ref_opt, None, 0, STEPS)
    assert not bound, f"the Python grad binding ran {len(bound)} times"
    assert all(p.grad is None for p in opt._plan.batches[0].params), "local grads left bound"
    assert_matches_reference(net, opt, ref, ref_opt, "FSDP2 AdamW, grads read in C++")
