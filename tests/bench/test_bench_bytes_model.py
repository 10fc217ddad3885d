"""The byte model behind every GB/s figure: exact counts for known parameter lists."""

import pytest
import torch

from fusedopt.bench.bytes_model import bytes_per_element, step_bytes, tensors_touched
from fusedopt.bench.optimizers import OPTIMIZERS
from fusedopt.bench.presets import get_preset, gpt2_shapes, llama_shapes, make_params

# 12 + 5 + 24 = 41 elements
SHAPES = [(3, 4), (5,), (2, 3, 4)]
N = 41


@pytest.mark.parametrize(
    "family, kw, dtype, expected",
    [
        ("sgd", {}, torch.float32, N * 3 * 4),                          # read p, g; write p
        ("sgd", {"momentum": 0.9}, torch.float32, N * 5 * 4),           # + read/write buf
        ("sgd", {"momentum": 0.9}, torch.float16, N * 5 * 2),
        ("sgd", {}, torch.float64, N * 3 * 8),
        ("adam", {}, torch.float32, N * 7 * 4),                          # p,g,m,v in; p,m,v out
        ("adamw", {}, torch.bfloat16, N * 7 * 2),
        ("adam", {"amsgrad": True}, torch.float32, N * 9 * 4),          # + max_exp_avg_sq in/out
        ("adamw", {"amsgrad": True}, torch.float64, N * 9 * 8),
    ],
)
def test_step_bytes_exact(family, kw, dtype, expected):
    assert step_bytes(family, SHAPES, dtype, **kw) == expected
    # same answer from tensors and from a plain element count
    tensors = [torch.empty(s, dtype=dtype) for s in SHAPES]
    assert step_bytes(family, tensors, dtype, **kw) == expected
    assert step_bytes(family, N, dtype, **kw) == expected


def test_literal_numbers():
    assert step_bytes("adam", SHAPES, torch.float32) == 1148
    assert step_bytes("sgd", SHAPES, torch.float32, momentum=0.9) == 820
    assert step_bytes("sgd", SHAPES, torch.float32) == 492
    assert step_bytes("adamw", SHAPES, torch.float32, amsgrad=True) == 1476


def test_bytes_per_element_table():
    assert bytes_per_element("sgd", 4) == 12
    assert bytes_per_element("sgd", 4, momentum=0.5) == 20
    assert bytes_per_element("adam", 4) == 28
    assert bytes_per_element("adamw", 2) == 14
    assert bytes_per_element("adam", 8, amsgrad=True) == 72
    assert tensors_touched("adam") == (4, 3)
    assert tensors_touched("sgd", momentum=0.9) == (3, 2)


def test_bench_optimizer_configs_use_the_model():
    expect = {"sgd": 20, "sgd-plain": 12, "adam": 28, "adam-amsgrad": 36, "adamw": 28,
              "rmsprop": 20, "adagrad": 20, "lion": 20}
    assert {name: cfg.bytes_per_element(4) for name, cfg in OPTIMIZERS.items()} == expect


def test_bad_arguments():
    with pytest.raises(ValueError):
        bytes_per_element("lamb", 4)
    with pytest.raises(ValueError):
        bytes_per_element("sgd", 4, amsgrad=True)
    with pytest.raises(ValueError):
        bytes_per_element("adam", 0)


def test_gpt2_small_preset_is_exact():
    shapes = gpt2_shapes()
    assert len(shapes) == 148
    assert sum(torch.Size(s).numel() for s in shapes) == 124_439_808
    assert shapes[0] == (50257, 768) and shapes[1] == (1024, 768)
    assert shapes[2:14] == [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                            (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    p = get_preset("gpt2-small", "cpu")
    assert p.numel == 124_439_808 and p.num_tensors == 148
    assert step_bytes("adam", shapes, torch.float32) == 124_439_808 * 28 == 3_484_314_624


def test_other_presets():
    assert get_preset("many-small", "cpu").shapes == [(1024,)] * 10_000
    assert get_preset("huge", "cpu").shapes == [(64 << 20,)]
    llama = get_preset("llama", "cpu")
    assert 100e6 <= llama.numel <= 200e6, llama.note
    assert "8/32 layers" in llama.note
    full = llama_shapes()
    assert len(full) == 1 + 32 * 9 + 2
    assert sum(torch.Size(s).numel() for s in full) == 6_738_415_616  # Llama-2-7B
    for name in ("gpt2-small", "many-small", "huge", "llama"):
        assert get_preset(name, "cpu", quick=True).numel <= 300_000


def test_make_params_is_seeded():
    a = make_params(SHAPES, torch.float32, "cpu", seed=3)
    b = make_params(SHAPES, torch.float32, "cpu", seed=3)
    c = make_params(SHAPES, torch.float32, "cpu", seed=4)
    assert [tuple(p.shape) for p in a] == SHAPES
    assert all(p.requires_grad and p.grad is not None and p.grad.shape == p.shape for p in a)
    assert all(torch.equal(x, y) and torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert len({p.data_ptr() for p in a}) == len(a)  # separate allocations
