"""In-kernel schedules: the fused kernel computes the lr from its own step count, and the
trajectory (lrs and params) equals the host scheduler's for every closed-form schedule."""

import copy

import pytest
import torch
from torch.optim import lr_scheduler as tls

import fusedopt
from fusedopt.lr_scheduler import WarmupCosine, in_kernel

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")

STEPS = 150
from emulated_cuda import DEVICES  # "cpu", "emul" (emulated CUDA kernels), "cuda"


def _pair(kind, device="cpu", lrs=(0.1, 0.03)):
    """Two identical fusedopt optimizers over two param groups with different lrs."""
    def build():
        g = torch.Generator().manual_seed(0)
        groups = [{"params": [torch.nn.Parameter(torch.randn(5, generator=g).to(device))], "lr": lr} for lr in lrs]
        if kind == "sgd":
            return fusedopt.SGD(groups, lr=lrs[0], momentum=0.9)
        return fusedopt.AdamW(groups, lr=lrs[0])
    return build(), build()


def _grads(opts, step):
    g = torch.Generator().manual_seed(1000 + step)
    for group_a, group_b in zip(opts[0].param_groups, opts[1].param_groups):
        for p, q in zip(group_a["params"], group_b["params"]):
            grad = torch.randn(p.shape, generator=g).to(p.device)
            p.grad, q.grad = grad.clone(), grad.clone()


def test_every_closed_form_schedule_matches_the_host_trajectory(schedule_case, recwarn):
    name, factory = schedule_case
    host_opt, kernel_opt = _pair("adam" if len(name) % 2 else "sgd")
    host = factory(host_opt)
    kernel = in_kernel(factory(kernel_opt))
    assert kernel_opt.lr_schedule_mode == "in-kernel" and host_opt.lr_schedule_mode == "host"
    for step in range(STEPS):
        host_lrs = [float(g["lr"]) for g in host_opt.param_groups]
        assert kernel.get_last_lr() == pytest.approx(host_lrs, rel=1e-6, abs=1e-12), step
        _grads((host_opt, kernel_opt), step)
        host_opt.step()
        kernel_opt.step()
        host.step()
        kernel.step()  # a no-op: the kernel advanced the schedule
    assert kernel.last_epoch == STEPS
    for pa, pb in zip(host_opt.param_groups, kernel_opt.param_groups):
        for p, q in zip(pa["params"], pb["params"]):
            # lr applied as float32 by both; the host's recursive lr and the closed form differ
            # by ~1e-15 relative, which float32 math absorbs
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skip_does_not_advance_the_schedule(device):
    opt, _ = _pair("adam", device)
    sched = in_kernel(tls.StepLR(opt, step_size=1, gamma=0.5))
    scaler = torch.amp.GradScaler(device)
    for step in range(4):
        _grads((opt, _), step)
        if step == 1:
            opt.param_groups[0]["params"][0].grad[0] = float("inf")
        scaler.scale(torch.zeros((), device=device, requires_grad=True)).backward()
        scaler.step(opt)
        scaler.update()
    assert sched.last_epoch == 3  # four steps, one skipped
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.5**3, 0.03 * 0.5**3])


def test_state_dict_round_trip_mid_run_continues_identically():
    a, b = _pair("sgd")
    sa = in_kernel(WarmupCosine(a, warmup_steps=10, total_steps=60, min_lr=1e-3))
    for step in range(25):
        _grads((a, b), step)
        a.step()
    # deepcopy = through a file: a live state_dict shares tensors with its optimizer
    saved_opt, saved_sched = copy.deepcopy(a.state_dict()), copy.deepcopy(sa.state_dict())
    assert saved_sched["last_epoch"] == 25
    sb = in_kernel(WarmupCosine(b, warmup_steps=10, total_steps=60, min_lr=1e-3))
    with torch.no_grad():  # the params travel in the model's state_dict, not the optimizer's
        for p, q in zip(a.param_groups[0]["params"] + a.param_groups[1]["params"],
                        b.param_groups[0]["params"] + b.param_groups[1]["params"]):
            q.copy_(p)
    b.load_state_dict(saved_opt)
    sb.load_state_dict(saved_sched)
    assert sb.get_last_lr() == pytest.approx(sa.get_last_lr(), rel=1e-12)
    for step in range(25, 50):
        _grads((a, b), step)
        a.step()
        b.step()
    assert sb.last_epoch == sa.last_epoch == 50
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_schedules_without_closed_form_stay_on_the_host():
    opt, _ = _pair("sgd")
    with pytest.raises(TypeError, match="LambdaLR has no closed form"):
        in_kernel(tls.LambdaLR(opt, lambda t: 0.9**t))
    with pytest.raises(TypeError, match="has no closed form"):
        in_kernel(tls.ReduceLROnPlateau(opt))
    assert opt.lr_schedule_mode == "host"


def test_needs_a_fusedopt_optimizer():
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match="needs a fusedopt optimizer"):
        in_kernel(tls.StepLR(torch_opt, 5))


def test_mode_is_said_plainly():
    opt, _ = _pair("adam")
    sched = in_kernel(tls.ExponentialLR(opt, 0.9))
    assert "in-kernel" in repr(sched) and "ExponentialLR" in repr(sched)
    assert sched.mode == "in-kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_training_step_follows_the_schedule_across_replays():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).cuda()
    ref = torch.nn.Linear(16, 16).cuda()
    ref.load_state_dict(model.state_dict())
    opt = fusedopt.AdamW(model.parameters(), lr=0.01, capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, foreach=False)
    sched = in_kernel(WarmupCosine(opt, warmup_steps=5, total_steps=40))
    ref_sched = WarmupCosine(ref_opt, warmup_steps=5, total_steps=40)
    x = torch.randn(8, 16, device="cuda")

    def step(m, o):
        o.zero_grad(set_to_none=False)
        m(x).square().mean().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, opt)
            step(ref, ref_opt)
            ref_sched.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt)
    for _ in range(20):
        graph.replay()
        step(ref, ref_opt)
        ref_sched.step()
    torch.cuda.synchronize()
    assert sched.last_epoch == 22
    assert sched.get_last_lr()[0] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _assert_step_refused(opt, step, match):
    """The next step (grads of `step`) raises ValueError matching `match`, before any param moves."""
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    _grads((opt, opt), step)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, [p for g in opt.param_groups for p in g["params"]]))


@pytest.mark.parametrize("device", DEVICES)
def test_an_lr_set_by_hand_is_refused_not_ignored(device):
    """The kernel computes every step's lr from the schedule, so an lr set by hand would be
    ignored: a value other than the schedule's raises at the next step, naming the group, before
    anything moves. The schedule's own value (as a loaded optimizer state_dict puts it back) is
    taken, as a float or a tensor."""
    a, _ = _pair("sgd", device)
    sched = in_kernel(tls.ExponentialLR(a, gamma=0.9))
    for step in range(3):
        _grads((a, a), step)
        a.step()
    a.param_groups[0]["lr"] = float(a.param_groups[0]["lr"])  # the schedule's value: taken
    a.param_groups[1]["lr"] = a.param_groups[1]["lr"].clone()
    _grads((a, a), 3)
    a.step()
    assert sched.last_epoch == 4
    a.param_groups[1]["lr"] = 0.5
    _assert_step_refused(a, 4, r"param_groups\[1\]\['lr'\] was set to 0\.5.*ExponentialLR.*step 4")
    assert sched.last_epoch == 4


@pytest.mark.parametrize("other", ["StepLR", "ReduceLROnPlateau", "inner"])
@pytest.mark.parametrize("device", DEVICES)
def test_another_scheduler_writing_the_lr_tensor_is_refused_not_ignored(device, other):
    """Every torch.optim.lr_scheduler writes a tensor lr in place (fill_): a second scheduler on
    an in-kernel optimizer (or the handed-over scheduler stepped by mistake) would have its lr
    silently overwritten by the kernel. A value other than the schedule's raises at the next step,
    naming the group, before anything moves; the schedule's own value written in place is taken."""
    a, _ = _pair("sgd", device)
    inner = tls.ExponentialLR(a, gamma=0.9)
    sched = in_kernel(inner)
    second = {"StepLR": lambda: tls.StepLR(a, step_size=1, gamma=0.5),
              "ReduceLROnPlateau": lambda: tls.ReduceLROnPlateau(a, factor=0.1, patience=0),
              "inner": lambda: None}[other]()
    for step in range(2):
        _grads((a, a), step)
        a.step()
    a.param_groups[0]["lr"].fill_(float(a.param_groups[0]["lr"]))  # the schedule's value: taken
    _grads((a, a), 2)
    a.step()
    assert sched.last_epoch == 3
    if other == "StepLR":
        second.step()
    elif other == "ReduceLROnPlateau":
        second.step(1.0)
        second.step(1.0)  # no improvement: the lr is cut
    else:
        inner.step()
    _assert_step_refused(a, 3, r"param_groups\[0\]\['lr'\] was changed in place.*ExponentialLR.*step 3")
    assert sched.last_epoch == 3


@pytest.mark.parametrize("steps", [3, 12], ids=["lr-still-lr(0)", "decayed"])
def test_resuming_the_optimizer_without_its_schedule_is_refused(steps):
    """An optimizer state_dict loaded into a run whose in-kernel schedule was not loaded: the
    next step raises before anything moves (the schedule would silently start over), also when
    the saved lr happens to equal the schedule's first (StepLR before its first decay). Loading
    the schedule's state too, in either order, is the way."""
    a, b = _pair("sgd")
    sa = in_kernel(tls.StepLR(a, step_size=5, gamma=0.5))
    for step in range(steps):
        _grads((a, b), step)
        a.step()
    sb = in_kernel(tls.StepLR(b, step_size=5, gamma=0.5))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    _grads((a, b), steps)
    before = [p.detach().clone() for g in b.param_groups for p in g["params"]]
    with pytest.raises(ValueError, match="Load the schedule's state_dict too"):
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(before, [p for g in b.param_groups for p in g["params"]]))
    sb.load_state_dict(sa.state_dict())
    for opt in (a, b):
        opt.step()
    assert sb.last_epoch == sa.last_epoch == steps + 1 and sb.get_last_lr() == sa.get_last_lr()
    # the other order: the schedule's state first, then the optimizer's
    c, _ = _pair("sgd")
    sc = in_kernel(tls.StepLR(c, step_size=5, gamma=0.5))
    sc.load_state_dict(sa.state_dict())
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    _grads((a, c), steps + 1)
    a.step()
    c.step()
    assert sc.last_epoch == sa.last_epoch and sc.get_last_lr() == sa.get_last_lr()


def test_get_state_dict_before_a_warmup_from_zero_keeps_the_schedule():
    """torch.distributed.checkpoint's get_state_dict before the first step (its zero-lr step
    on zero grads) with a schedule whose own first lr is 0 too: the step does not count, and the
    schedule goes on from its first step (before, the group stayed at lr 0 for good)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from fusedopt.lr_scheduler import LinearWarmup

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    sched = in_kernel(WarmupCosine(opt, warmup_steps=10, total_steps=100))
    ref_sched = WarmupCosine(ref_opt, warmup_steps=10, total_steps=100)
    get_state_dict(model, opt)
    get_state_dict(ref, ref_opt)  # (its zero-lr step counts in Adam's step counters, as in torch)
    assert sched.last_epoch == 0
    for _ in range(20):
        x = torch.randn(8, 4)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        ref_sched.step()
    assert sched.last_epoch == 20
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # a group whose lr at step 0 is 0 and another's is not, in one optimizer
    a, _ = _pair("sgd")
    sa = in_kernel(LinearWarmup(a, 4, [0.0, 0.01], [0.1, 0.1]))
    saved = [g["lr"] for g in a.param_groups]
    for g in a.param_groups:
        g["lr"] = torch.tensor(0.0)
    _grads((a, a), 0)
    a.step()
    for g, lr in zip(a.param_groups, saved):
        g["lr"] = lr
    for step in range(8):
        _grads((a, a), step + 1)
        a.step()
    assert sa.last_epoch == 8
    assert all(float(g["lr"]) > 0.05 for g in a.param_groups)


def test_get_last_lr_after_a_pause_is_the_schedules():
    a, _ = _pair("sgd", lrs=(0.1, 0.2))
    sched = in_kernel(tls.ExponentialLR(a, gamma=0.5))
    tracked = a.param_groups[1]["lr"]
    a.param_groups[1]["lr"] = 0.0
    for step in range(2):
        _grads((a, a), step)
        a.step()
    a.param_groups[1]["lr"] = tracked  # put back: it still holds the lr from before the pause
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.5**2, 0.2 * 0.5**2], rel=1e-12)
    _grads((a, a), 2)
    a.step()
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.5**3, 0.2 * 0.5**3], rel=1e-12)


def test_a_group_added_after_in_kernel_is_refused():
    a, _ = _pair("sgd")
    in_kernel(tls.StepLR(a, step_size=5))
    a.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.3})
    _grads((a, a), 0)
    with pytest.raises(ValueError, match="has 3 param groups but its in-kernel schedule was made for 2"):
        a.step()


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_with_every_lr_zero_is_not_the_schedules(device):
    """torch.distributed.checkpoint's get_state_dict makes the state of an optimizer that never
    stepped by one step on zero grads with every group's lr set to 0 (a tensor 0 for a tensor
    lr), then puts the lrs back. That step moves no param (AdamW's weight decay included) and
    does not count for the schedule; the run then goes on as torch's AdamW with its host
    scheduler does after the same step."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, generator=g), torch.randn(3, generator=g)]
    a = fusedopt.AdamW([{"params": [torch.nn.Parameter(init[0].to(device))], "lr": 0.1},
                        {"params": [torch.nn.Parameter(init[1].to(device))], "lr": 0.03}], lr=0.1)
    t = torch.optim.AdamW([{"params": [torch.nn.Parameter(init[0].clone())], "lr": 0.1},
                           {"params": [torch.nn.Parameter(init[1].clone())], "lr": 0.03}], lr=0.1, foreach=False)
    sa, st = in_kernel(tls.StepLR(a, step_size=2, gamma=0.5)), tls.StepLR(t, step_size=2, gamma=0.5)
    for opt in (a, t):  # torch.distributed.checkpoint.state_dict._init_optim_state
        saved = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
            group["lr"] = torch.tensor(0.0) if torch.is_tensor(group["lr"]) else 0.0
        opt.step()
        for group, lr in zip(opt.param_groups, saved):
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p.cpu(), q) for p, q in zip([p for gr in a.param_groups for p in gr["params"]], init))
    assert sa.last_epoch == 0 and len(a.state) == 2  # the state is made
    for step in range(5):
        grads = [torch.randn(q.shape, generator=g) for q in init]
        for opt in (a, t):
            for group, grad in zip(opt.param_groups, grads):
                group["params"][0].grad = grad.to(group["params"][0].device)
            opt.step()
        st.step()
        assert sa.get_last_lr() == pytest.approx(st.get_last_lr(), rel=1e-12)
    for ga, gt in zip(a.param_groups, t.param_groups):
        torch.testing.assert_close(ga["params"][0].detach().cpu(), gt["params"][0].detach(), rtol=1e-5, atol=1e-6)


def test_resuming_into_an_optimizer_made_at_another_lr_follows_the_loaded_schedule():
    """A resumed optimizer built at the saved lr (as a checkpoint without 'initial_lr' gives it)
    makes its schedule from that lr; loading the schedule's state brings the saved base lrs, and
    the kernel's phases follow them: the lrs equal the uninterrupted host schedule's."""
    def lrs_after_resume(kernel):
        p = torch.nn.Parameter(torch.ones(3))
        o1 = fusedopt.SGD([p], lr=0.01)
        s1 = tls.StepLR(o1, step_size=2, gamma=0.5)
        s1 = in_kernel(s1) if kernel else s1
        for _ in range(3):
            p.grad = torch.ones(3)
            o1.step()
            s1.step()
        q = torch.nn.Parameter(torch.ones(3))
        o2 = fusedopt.SGD([q], lr=float(o1.param_groups[0]["lr"]))
        s2 = tls.StepLR(o2, step_size=2, gamma=0.5)
        s2 = in_kernel(s2) if kernel else s2
        s2.load_state_dict(copy.deepcopy(s1.state_dict()))
        out = []
        for _ in range(4):
            q.grad = torch.ones(3)
            out.append(float(o2.param_groups[0]["lr"]))
            o2.step()
            s2.step()
        return out

    host = lrs_after_resume(False)
    assert host == [0.005, 0.0025, 0.0025, 0.00125]
    assert lrs_after_resume(True) == pytest.approx(host, rel=1e-12)
