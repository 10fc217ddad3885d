"""Package behaviour: import never crashes without a usable extension and says why;
torch.compile traces optimizer.step()."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedopt

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_import_without_extension_warns_and_optimizer_explains():
    r = _run("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fusedopt
        assert not fusedopt.extension_available()
        print("WARN:", " | ".join(str(x.message) for x in w))
        p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.ones(3)
        opt = fusedopt.Adam([p])
        try:
            opt.step()
        except RuntimeError as e:
            print("STEP:", e)
    """, FUSEDOPT_NO_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert "WARN: fusedopt: the compiled extension is disabled by FUSEDOPT_NO_EXTENSION" in r.stdout
    assert "STEP: fusedopt: the compiled extension is disabled" in r.stdout


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
def test_torch_version_mismatch_is_reported_not_an_undefined_symbol():
    r = _run("""
        import warnings, torch
        torch.__version__ = "1.0.0"  # as if torch were upgraded after the build
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fusedopt
        print(fusedopt.extension_available(), fusedopt.extension_error())
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False")
    assert "was built against torch" in r.stdout and "but torch 1.0.0 is running" in r.stdout
    assert "Rebuild fusedopt" in r.stdout


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
def test_a_cpu_without_the_build_isa_is_reported_before_the_library_loads():
    """As if the extension had been built for an instruction set this CPU lacks: the import
    says so instead of loading code that would die of an illegal instruction."""
    r = _run("""
        import sys, types, warnings, torch
        fake = types.ModuleType("fusedopt._build_info")
        fake.TORCH_VERSION, fake.TORCH_CUDA_VERSION, fake.WITH_CUDA = torch.__version__, None, False
        fake.CPU_ISA, fake.CPU_FLAGS = "avx512", ("avx2", "no_such_cpu_flag")
        sys.modules["fusedopt._build_info"] = fake
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fusedopt
        print(fusedopt.extension_available(), "fusedopt._C" in sys.modules, fusedopt.extension_error())
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False False"), r.stdout
    assert "compiled for the avx512 instruction set" in r.stdout and "lacks no_such_cpu_flag." in r.stdout


def test_missing_cpu_flags_reads_cpuinfo(tmp_path):
    from fusedopt._extension import _missing_cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 fma f16c avx512f\n")
    assert _missing_cpu_flags(("avx2", "fma", "f16c"), str(info)) == []
    assert _missing_cpu_flags(("avx2", "avx512f", "avx512bw", "avx512vl"), str(info)) == ["avx512bw", "avx512vl"]
    assert _missing_cpu_flags(("avx2",), str(tmp_path / "absent")) == []  # unreadable: the library checks


def _twin_linears():
    """Two Linear(8, 4) with the same weights, for a compiled run against an eager one."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    return model, ref


def _train_twins(models, steps, compiled_step, ref_step, after_step=lambda: None):
    """`steps` steps of both models on the same data: the first steps by `compiled_step`, the
    second by `ref_step`."""
    for _ in range(steps):
        x = torch.randn(16, 8)
        for m in models:
            m.zero_grad()
            m(x).square().mean().backward()
        compiled_step()
        ref_step()
        after_step()


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("cls,ref_cls", [(fusedopt.AdamW, torch.optim.AdamW), (fusedopt.SGD, torch.optim.SGD)])
def test_torch_compile_traces_step_in_one_graph(cls, ref_cls):
    import torch._dynamo

    model, ref = _twin_linears()
    kw = dict(lr=0.01, momentum=0.9) if cls is fusedopt.SGD else dict(lr=0.01)
    opt, ref_opt = cls(model.parameters(), **kw), ref_cls(ref.parameters(), foreach=False, **kw)
    _train_twins((model, ref), 3, torch.compile(opt.step), ref_opt.step)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    model(torch.randn(2, 8)).sum().backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    ops = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("fusedopt" in str(t) for t in ops), ops


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("grads", ["flatten_", "bucket-views"])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD])
def test_torch_compile_with_inductor_takes_grads_that_are_views_of_one_buffer(cls, grads):
    """The default backend (inductor) with the grads all views of one buffer, as flat storage and
    DDP's gradient_as_bucket_view make them: inductor fails on a mutable list of inputs that alias
    each other, so a step without a grad scale calls the op's overload whose grads are only read.
    The compiled steps are bit-identical to eager ones."""
    model, ref = _twin_linears()
    if grads == "flatten_":
        fusedopt.flatten_(model)
    kw = dict(lr=0.01, momentum=0.9) if cls is fusedopt.SGD else dict(lr=0.01)
    opt, ref_opt = cls(model.parameters(), **kw), cls(ref.parameters(), **kw)

    def bucket_grads():  # each param's grad a view of one buffer, as DDP's bucket views
        if grads != "bucket-views":
            return
        params = list(model.parameters())
        bucket = torch.cat([p.grad.flatten() for p in params])
        at = 0
        for p in params:
            p.grad = bucket[at: at + p.numel()].view_as(p)
            at += p.numel()

    compiled = torch.compile(opt.step)

    def step():
        bucket_grads()
        compiled()

    _train_twins((model, ref), 3, step, ref_opt.step)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flatten_"])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.RMSprop, fusedopt.Lion])
def test_torch_compile_fullgraph_with_a_tensor_lr_that_changes(cls, flat):
    """fullgraph=True (any graph break raises) for the first step, which makes the state, and
    the later ones, with or without flat storage in the process (a compiled step treats flat
    params as ordinary ones). A tensor lr changed in place between steps reaches the op as a
    tensor, not as a Python float: no graph break on .item() and no recompile per lr (two
    frames: the first step, which makes the state, and the steady one), and the steps are
    bit-identical to eager ones."""
    from torch._dynamo.testing import CompileCounter

    model, ref = _twin_linears()
    if flat:
        fusedopt.flatten_(model)
    opt = cls(model.parameters(), lr=torch.tensor(0.01))
    ref_opt = cls(ref.parameters(), lr=torch.tensor(0.01))
    counter = CompileCounter()

    def lower_lrs():
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"].mul_(0.7)

    _train_twins((model, ref), 5, torch.compile(opt.step, backend=counter, fullgraph=True), ref_opt.step, lower_lrs)
    assert counter.frame_count == (1 if cls is fusedopt.SGD else 2)  # SGD(momentum=0): no state
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
def test_torch_compile_with_a_scheduled_tensor_lr_reads_no_item():
    """torch's advice for compiled steps with a scheduler: a tensor lr, which the scheduler fills
    in place. fusedopt passes it to the op, so dynamo meets no Tensor.item() (which breaks the
    graph and re-traces: 4 frames before) and traces the step twice in all (first and steady);
    bit-identical to eager."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    model, ref = _twin_linears()
    counters.clear()
    opt, ref_opt = fusedopt.Adam(model.parameters(), lr=torch.tensor(0.01)), fusedopt.Adam(ref.parameters(), lr=torch.tensor(0.01))
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8) for o in (opt, ref_opt)]
    counter = CompileCounter()

    def step_schedules():
        for sched in scheds:
            sched.step()

    _train_twins((model, ref), 6, torch.compile(opt.step, backend=counter), ref_opt.step, step_schedules)
    assert not [reason for reason in counters["graph_break"] if "item()" in reason]
    assert counter.frame_count == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam, torch.optim.SGD])
def test_step_between_forward_and_backward_is_refused_like_torch(cls):
    # torch's in-place updates bump version counters, so autograd refuses a backward through
    # weights the step changed; fusedopt's fused update must too (not silently wrong grads).
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = cls(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    loss = model(torch.randn(3, 4)).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")
def test_extension_uses_the_shared_cpp_runtime():
    """fusedopt._C must load libstdc++ as a shared library, the one torch uses. A copy linked
    into it (a compiler that links libstdc++ statically, as the H200 machines' g++ 13.3 did)
    crashed the process, or cut error messages short, whenever an op raised an error."""
    from fusedopt import _C

    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not found")
    dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed
    # and an error message built from numbers comes through whole
    from fusedopt.ops import ADAM_COLUMNS

    n = len(ADAM_COLUMNS)
    p = torch.nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match=rf"hyper has shape \[1, {n + 5}\] but 1 groups of {n} columns were expected"):
        torch.ops.fusedopt.adam_([p], [torch.zeros(3, 5)], [torch.zeros(3, 5)], [torch.zeros(3, 5)], [],
                                 [torch.zeros(())], [1], torch.zeros(1, n + 5, dtype=torch.float64),
                                 [], schedule_state=[])
