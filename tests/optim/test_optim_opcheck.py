"""(7) The fused ops themselves: ``torch.library.opcheck`` on ``torch.ops.fusedopt.step_`` (what
the optimizer classes call, for every rule), ``adam_`` and ``sgd_`` (schema/mutation annotations,
autograd registration, fake tensor kernel, AOT dispatch), and the "one fused op per device per
step" contract.

The op arguments are not rebuilt by hand: a TorchDispatchMode records (a clone of) exactly what
fusedopt's optimizers pass to the ops during real steps - first step (fresh state), later steps,
mixed param groups, tensor lr, half dtypes, and the GradScaler path (grad_scale / found_inf) - and
opcheck is run on those recorded calls.  Declared schemas (fusedopt/ops.py, csrc/ops.cpp):
  adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, hyper,
        lr_tensors, grad_scale=None, found_inf=None) -> ()
  sgd_(params, grads, momentum_buffers, group_sizes, hyper, lr_tensors, fresh_buffers,
       grad_scale=None, found_inf=None) -> ()
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optim_parity_utils import RecordFusedOps, op_device, assert_close_dtype, build_pair, feed_same_grads, make_gen





SCENARIOS = {
    "adam-mixed-groups": ("Adam", dict(lr=1e-2, weight_decay=0.1), [{}, {"amsgrad": True, "maximize": True, "lr": 0.02}], torch.float32, False),
    "adamw-tensor-lr": ("AdamW", dict(lr=torch.tensor(1e-2), amsgrad=True), [{}, {"betas": (0.8, 0.9)}], torch.float32, False),
    "adam-bf16": ("Adam", dict(lr=1e-2), [{}, {}], torch.bfloat16, False),
    "adam-amp": ("Adam", dict(lr=1e-2, amsgrad=True), [{}, {}], torch.float32, True),
    "sgd-momentum-groups": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1), [{}, {"momentum": 0.0}], torch.float32, False),
    "sgd-nesterov-f64": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), [{}, {}], torch.float64, False),
    "sgd-amp": ("SGD", dict(lr=0.1, momentum=0.9), [{}, {}], torch.float32, True),
}


def record(scenario, device, steps=2):
    name, ctor, extra, dtype, amp = SCENARIOS[scenario]
    groups = [([(3,), (2, 5)], extra[0]), ([(7,)], extra[1])]
    ref, fo = build_pair(name, groups, dtype=dtype, device=device, ctor=ctor)
    gen = make_gen(3)
    per_step = []
    scaler = torch.amp.GradScaler(device) if amp else None
    if amp:
        scaler.scale(torch.ones((), device=device))  # initialises the scale lazily, like scale(loss)
    for t in range(steps):
        feed_same_grads(ref, fo, gen, dtype=dtype)
        rec = RecordFusedOps()
        if amp:
            for p in fo.params:
                p.grad.mul_(scaler.get_scale())
            if t == 1:
                fo.params[0].grad.view(-1)[0] = float("inf")  # a skipped step: found_inf = 1
        with rec:
            if amp:
                scaler.step(fo.opt)
            else:
                fo.opt.step()
        if amp:
            scaler.update()
        per_step.append(rec.calls)
    return name, per_step


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_fused_op_call_per_device_per_step(scenario, device):
    name, per_step = record(scenario, device)
    expected_op = "fusedopt::step_"  # every optimizer class calls the generic op
    for t, calls in enumerate(per_step):
        names = [c[0]._schema.name for c in calls]
        assert names == [expected_op], f"step {t}: fused op calls {names}, expected exactly one {expected_op}"
        devs = Counter(op_device(a, k) for _, a, k in calls)
        assert all(n == 1 for n in devs.values())


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_opcheck(scenario, device):
    _, per_step = record(scenario, device)
    # step 0: fresh state (momentum buffers to initialise); step 1: steady state / skipped AMP step
    for t, calls in enumerate(per_step):
        for func, args, kwargs in calls:
            torch.library.opcheck(func, args, kwargs)
            grad_scale = args[10] if len(args) > 10 else kwargs.get("grad_scale")
            if func._schema.name == "fusedopt::step_" and grad_scale is None:
                # the overload a compiled step without a grad scale calls (grads only read)
                kw = {k: v for k, v in kwargs.items() if k != "grad_scale"}
                torch.library.opcheck(torch.ops.fusedopt.step_.keep_grads, tuple(args[:10]) + tuple(args[11:]), kw)


def test_ops_registered_with_expected_schemas():
    """The ops exist, mutate (only) their state arguments, and return nothing."""
    import fusedopt  # noqa: F401 - loads the extension

    for op, mutated in (
        ("adam_", {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"}),
        ("sgd_", {"params", "momentum_buffers"}),
        ("step_", {"params", "states", "masters", "state_steps"}),
        ("step_.keep_grads", {"params", "states", "masters", "state_steps"}),
    ):
        name, _, overload = op.partition(".")
        assert hasattr(torch.ops.fusedopt, name), f"torch.ops.fusedopt.{name} is not registered"
        schema = getattr(getattr(torch.ops.fusedopt, name), overload or "default")._schema
        assert len(schema.returns) == 0, f"{op} should return nothing (in-place op): {schema}"
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutated <= written, f"{op}: arguments mutated but not annotated as written: {mutated - written} ({schema})"
        assert ("grads" in written) == (op != "step_.keep_grads"), schema


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_op_per_device_with_cpu_and_cuda_params():
    import fusedopt

    ps = [torch.randn(4, requires_grad=True), torch.randn(5, device="cuda", requires_grad=True)]
    for name in ("SGD", "Adam"):
        opt = getattr(fusedopt, name)(ps, lr=0.01, **({"momentum": 0.9} if name == "SGD" else {}))
        for p in ps:
            p.grad = torch.ones_like(p)
        rec = RecordFusedOps()
        with rec:
            opt.step()
        devs = Counter(op_device(a, k).type for _, a, k in rec.calls)
        assert devs == Counter({"cpu": 1, "cuda": 1}), devs


# ----------------------------------------------------------------------- functional forms
def test_functional_adam_matches_torch(device):
    """fusedopt.ops.adam (functional, one param group) vs torch.optim.adam.adam (for-loop)."""
    from fusedopt import ops
    from torch.optim.adam import adam as torch_adam

    gen = make_gen(5)
    shapes = [(3,), (4, 5)]
    p0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    pa, pb = [p.clone() for p in p0], [p.clone() for p in p0]
    sa = [[torch.zeros_like(p) for p in p0] for _ in range(3)]
    sb = [[torch.zeros_like(p) for p in p0] for _ in range(3)]
    steps_a = [torch.tensor(0.0) for _ in p0]
    steps_b = [torch.tensor(0.0) for _ in p0]
    hp = dict(amsgrad=True, beta1=0.9, beta2=0.99, lr=0.01, weight_decay=0.1, eps=1e-8, maximize=False)
    for _ in range(5):
        g = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
        ops.adam(pa, g, *sa, steps_a, decoupled_weight_decay=True, **hp)
        torch_adam(pb, g, *sb, steps_b, foreach=False, decoupled_weight_decay=True, **hp)
    for a, b in zip(pa, pb):
        assert_close_dtype(a, b, torch.float64, "functional adam")
    assert [float(s) for s in steps_a] == [float(s) for s in steps_b]


def test_functional_sgd_matches_torch(device):
    from fusedopt import ops
    from torch.optim.sgd import sgd as torch_sgd

    gen = make_gen(6)
    shapes = [(3,), (4, 5)]
    p0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    pa, pb = [p.clone() for p in p0], [p.clone() for p in p0]
    ba, bb = [None, None], [None, None]
    hp = dict(weight_decay=0.01, momentum=0.9, lr=0.1, dampening=0.1, nesterov=False, maximize=False)
    for _ in range(5):
        g = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
        ops.sgd(pa, g, ba, **hp)
        torch_sgd(pb, g, bb, foreach=False, **hp)
    for a, b in zip(pa + ba, pb + bb):
        assert_close_dtype(a, b, torch.float64, "functional sgd")
