"""The bytes model of the newer optimizers (RMSprop, Adagrad, Lion) and of fusedopt's precision
options, with every count derived by hand, plus --quick CLI smoke runs of both.

Hand derivations use, per element, (tensor: bytes read + bytes written):
  p param, g grad (param dtype, read only), M float32 master, R int16 remainder, states.
"""

import json

import pytest
import torch

from fusedopt.bench.__main__ import main
from fusedopt.bench.bytes_model import bytes_per_element, element_traffic, state_roles, step_bytes, tensors_touched
from fusedopt.bench.optimizers import (OPTIMIZERS, PRECISION_IMPLS, PRECISIONS, Unsupported, build_optimizer,
                                       get_impl)
from fusedopt.bench.presets import get_preset, gpt2_shapes, make_params
from fusedopt.bench.runner import BenchConfig, expand_precisions, plan_cells, preset_plan

SHAPES = [(3, 4), (5,), (2, 3, 4)]  # 41 elements
N = 41
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# New optimizers, no precision options: p r+w, g r, each state r+w, all at the param's size.
@pytest.mark.parametrize(
    "family, kw, dtype, expected",
    [
        ("rmsprop", {}, FP32, N * (4 + 4 + 4 + 4 + 4)),                       # p, p', g, sq, sq' = 20
        ("rmsprop", {"momentum": 0.9}, FP32, N * 28),                        # + buf r/w
        ("rmsprop", {"centered": True}, FP32, N * 28),                       # + grad_avg r/w
        ("rmsprop", {"momentum": 0.9, "centered": True}, BF16, N * 9 * 2),   # p2 g1 sq2 buf2 ga2 = 9 x 2
        ("adagrad", {}, FP32, N * 20),                                       # p2 g1 sum2 = 5 x 4
        ("adagrad", {}, FP16, N * 10),
        ("lion", {}, FP32, N * 20),                                          # p2 g1 exp_avg2
        ("lion", {}, torch.float64, N * 40),
    ],
)
def test_new_optimizers_step_bytes(family, kw, dtype, expected):
    assert step_bytes(family, SHAPES, dtype, **kw) == expected
    assert step_bytes(family, N, dtype, **kw) == expected


def test_new_optimizers_tables():
    assert tensors_touched("rmsprop") == (3, 2)
    assert tensors_touched("rmsprop", momentum=0.9, centered=True) == (5, 4)
    assert tensors_touched("adagrad") == (3, 2)
    assert tensors_touched("lion") == (3, 2)
    assert state_roles("rmsprop", momentum=0.9, centered=True) == ["square_avg", "momentum_buffer", "grad_avg"]
    assert state_roles("adagrad") == ["sum"] and state_roles("lion") == ["exp_avg"]
    # the benchmark's configs: torch's default RMSprop / Adagrad (one state), Lion (one state)
    assert OPTIMIZERS["rmsprop"].bytes_per_element(4) == 20
    assert OPTIMIZERS["adagrad"].bytes_per_element(2) == 10
    assert OPTIMIZERS["lion"].bytes_per_element(4) == 20
    with pytest.raises(ValueError):
        bytes_per_element("lion", 4, amsgrad=True)
    with pytest.raises(ValueError):
        bytes_per_element("adagrad", 4, centered=True)
    with pytest.raises(ValueError):
        bytes_per_element("lion", 4, momentum=0.9)


# ---------------------------------------------------------------------------------------------
# Precision options on bfloat16 Adam (p g M/R m v):
#   none                  p 2+2  g 2          m 2+2  v 2+2  = 14
#   master                p 0+2  g 2  M 4+4   m 2+2  v 2+2  = 20  (param only written)
#   master+rem            p 2+2  g 2  R 2+2   m 2+2  v 2+2  = 18
#   fp32-state            p 2+2  g 2          m 4+4  v 4+4  = 22
#   master+fp32-state     p 0+2  g 2  M 4+4   m 4+4  v 4+4  = 28  (the "28 bytes per element")
#   sr                    same as none                      = 14
ADAM_BF16 = {"none": 14, "master": 20, "master+rem": 18, "fp32-state": 22, "master+fp32-state": 28, "sr": 14}
# SGD with momentum (one buffer b):
#   none 2+2+2+(2+2)=10; master 2+2+8+4=16; master+rem 4+2+4+4=14; fp32-state 4+2+8=14;
#   master+fp32-state 2+2+8+8=20; sr 10
SGD_BF16 = {"none": 10, "master": 16, "master+rem": 14, "fp32-state": 14, "master+fp32-state": 20, "sr": 10}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_precision_bytes_adam_and_sgd_bf16(precision):
    kw = PRECISIONS[precision]
    assert step_bytes("adam", SHAPES, BF16, **kw) == N * ADAM_BF16[precision]
    assert step_bytes("adamw", N, BF16, **kw) == N * ADAM_BF16[precision]
    assert step_bytes("sgd", SHAPES, BF16, momentum=0.9, **kw) == N * SGD_BF16[precision]
    assert OPTIMIZERS["adam"].bytes_per_element(2, **kw) == ADAM_BF16[precision]
    assert OPTIMIZERS["sgd"].bytes_per_element(2, **kw) == SGD_BF16[precision]


def test_precision_traffic_breakdown():
    assert element_traffic("adam", BF16, master_weights=True, state_dtype=FP32) == [
        ("param", 0, 2), ("grad", 2, 0), ("master_param", 4, 4), ("exp_avg", 4, 4), ("exp_avg_sq", 4, 4)]
    assert element_traffic("adam", BF16, master_weights=True, master_remainders=True) == [
        ("param", 2, 2), ("grad", 2, 0), ("master_remainder", 2, 2), ("exp_avg", 2, 2), ("exp_avg_sq", 2, 2)]
    # fp16 master: the same as bf16's
    assert step_bytes("adam", N, FP16, master_weights=True) == N * 20
    # plain SGD (no state) with a master: p 0+2, g 2, M 4+4 = 12; fp32-state changes nothing there
    assert step_bytes("sgd", N, BF16, master_weights=True) == N * 12
    assert step_bytes("sgd", N, BF16, state_dtype=FP32) == N * 6
    # the new optimizers: Lion bf16, master + fp32 exp_avg: p 0+2, g 2, M 8, m 8 = 20
    assert step_bytes("lion", N, BF16, master_weights=True, state_dtype=FP32) == N * 20
    # Adagrad bf16 with an fp32 sum: p 4, g 2, sum 8 = 14; RMSprop master+rem: 4 + 2 + 4 + 4 = 14
    assert step_bytes("adagrad", N, BF16, state_dtype=FP32) == N * 14
    assert step_bytes("rmsprop", N, BF16, master_weights=True, master_remainders=True) == N * 14
    # amsgrad with fp32 state: p 4, g 2, three fp32 states r/w 24 = 30
    assert step_bytes("adam", N, BF16, amsgrad=True, state_dtype=FP32) == N * 30
    # a bf16 state on fp32 params halves the state traffic: p 8, g 4, m 4, v 4 = 20
    assert step_bytes("adam", N, FP32, state_dtype=BF16) == N * 20


def test_precision_options_do_nothing_on_fp32_params():
    for name, kw in PRECISIONS.items():
        if name == "master+rem":
            continue
        assert step_bytes("adam", N, FP32, **kw) == N * 28, name
        if "fp32-state" not in name:
            assert step_bytes("sgd", N, torch.float64, momentum=0.9, **kw) == N * 40, name
    # but an fp32 state on float64 params is narrower: p 8+8, g 8, buf 4+4 = 32
    assert step_bytes("sgd", N, torch.float64, momentum=0.9, state_dtype=FP32) == N * 32


def test_precision_bad_combinations():
    with pytest.raises(ValueError):
        step_bytes("adam", N, BF16, master_remainders=True)             # needs master_weights
    with pytest.raises(ValueError):
        step_bytes("adam", N, FP16, master_weights=True, master_remainders=True)  # bf16 only
    with pytest.raises(ValueError):
        step_bytes("adam", N, BF16, master_weights=True, stochastic_rounding=True)


def test_gpt2_mixed_preset_bytes():
    shapes = gpt2_shapes()
    numel = 124_439_808
    assert get_preset("mixed", "cpu").shapes == shapes
    assert step_bytes("adam", shapes, BF16, master_weights=True, state_dtype=FP32) == numel * 28 == 3_484_314_624
    assert step_bytes("adam", shapes, BF16) == numel * 14


# ---------------------------------------------------------------------------------------------
def test_variant_impls_and_plan():
    assert set(PRECISION_IMPLS) == {"fusedopt:master", "fusedopt:master+rem", "fusedopt:fp32-state",
                                    "fusedopt:master+fp32-state", "fusedopt:sr"}
    assert get_impl("fusedopt:master+fp32-state").precision_kwargs == dict(master_weights=True, state_dtype=FP32)
    assert expand_precisions(["fusedopt", "torch-fused"], ["none", "sr"]) == ["fusedopt", "fusedopt:sr", "torch-fused"]
    with pytest.raises(ValueError):
        expand_precisions(["fusedopt"], ["fp8"])
    cfg = BenchConfig(presets=["mixed", "huge"], devices=["cpu"], dtypes=["fp32"], optimizers=["adam"],
                      impls=["fusedopt", "torch-fused"])
    dtypes, opts, impls = preset_plan(cfg, "mixed")
    assert dtypes == ["bf16"] and opts == ["adam", "sgd"]
    assert impls == ["fusedopt", "fusedopt:master", "fusedopt:master+rem", "fusedopt:fp32-state",
                     "fusedopt:master+fp32-state", "fusedopt:sr", "torch-foreach", "torch-fused"]
    assert preset_plan(cfg, "huge") == (["fp32"], ["adam"], ["fusedopt", "torch-fused"])
    cells = plan_cells(cfg)
    assert len(cells) == 2 * 8 + 2
    assert cells[0][:4] == ("cpu", "bf16", "mixed", "adam")  # dtypes in the order the presets bring them
    assert cells[-1] == ("cpu", "fp32", "huge", "adam", "torch-fused")
    # explicit flags override the preset's own defaults; lion gets torch rows only where --impls
    # names them (they are n/a: torch.optim has no Lion)
    cfg2 = BenchConfig(presets=["mixed"], devices=["cpu"], dtypes=["fp16"], optimizers=["lion"],
                       impls=["fusedopt", "torch-fused"], dtypes_explicit=True, optimizers_explicit=True,
                       impls_explicit=True, precisions=["master"])
    assert plan_cells(cfg2) == [("cpu", "fp16", "mixed", "lion", "fusedopt"),
                                ("cpu", "fp16", "mixed", "lion", "fusedopt:master"),
                                ("cpu", "fp16", "mixed", "lion", "torch-fused")]
    cfg2.impls_explicit = False
    assert [c[-1] for c in plan_cells(cfg2)] == ["fusedopt", "fusedopt:master"]


def test_build_optimizer_applies_precision():
    params = make_params(SHAPES, BF16, "cpu", seed=1)
    opt = build_optimizer(get_impl("fusedopt:master+fp32-state"), OPTIMIZERS["adam"], params)
    opt.step()
    st = opt.state[params[0]]
    assert st["master_param"].dtype == FP32 and st["exp_avg"].dtype == FP32 and st["exp_avg_sq"].dtype == FP32
    opt = build_optimizer(get_impl("fusedopt:master+rem"), OPTIMIZERS["sgd"], params)
    opt.step()
    st = opt.state[params[0]]
    assert st["master_remainder"].dtype == torch.int16 and st["momentum_buffer"].dtype == BF16
    with pytest.raises(Unsupported, match="16-bit"):
        build_optimizer(get_impl("fusedopt:master"), OPTIMIZERS["adam"], make_params(SHAPES, FP32, "cpu"))
    with pytest.raises(Unsupported, match="no fused"):
        build_optimizer(get_impl("torch-fused"), OPTIMIZERS["rmsprop"], params)
    with pytest.raises(Unsupported, match="no Lion"):
        build_optimizer(get_impl("torch-foreach"), OPTIMIZERS["lion"], params)


# ---------------------------------------------------------------------------------------------
def test_cli_quick_mixed(tmp_path, capsys):
    rc = main(["--quick", "--devices", "cpu", "--presets", "mixed", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "B/elem" in text and "vs torch-fused" in text and "Precision variants" in text
    res = json.loads((tmp_path / "results.json").read_text())
    recs = res["results"]
    assert {r["dtype"] for r in recs} == {"bf16"} and {r["preset"] for r in recs} == {"mixed"}
    assert len(recs) == 2 * 8
    by = {(r["optimizer"], r["impl"]): r for r in recs}
    for opt, table in (("adam", ADAM_BF16), ("sgd", SGD_BF16)):
        for prec, bpe in table.items():
            name = "fusedopt" if prec == "none" else f"fusedopt:{prec}"
            r = by[(opt, name)]
            assert r["status"] == "ok", (opt, name, r.get("reason"))
            assert r["precision"] == prec and r["bytes_per_element"] == bpe
            assert r["bytes_per_step"] == r["numel"] * bpe
            assert r["gbps"] == pytest.approx(r["bytes_per_step"] / (r["median_ms"] / 1e3) / 1e9)
            fused = by[(opt, "torch-fused")]
            assert r["speedup_vs_torch_fused"] == pytest.approx(fused["median_ms"] / r["median_ms"])
        assert by[(opt, "torch-fused")]["bytes_per_element"] == table["none"]
        assert "fusedopt_speedup" in by[(opt, "torch-foreach")]
    md = (tmp_path / "results.md").read_text()
    header = "| preset | optimizer | impl | B/elem | ms/step | GB/s | % of stream BW | fusedopt speedup | vs torch-fused |"
    assert header in md
    rows = [line for line in md.splitlines() if line.startswith("| mixed ")]
    assert len(rows) == 16 and all(line.count("|") == 10 for line in rows)


def test_cli_quick_new_optimizers(tmp_path, capsys):
    rc = main(["--quick", "--devices", "cpu", "--presets", "gpt2-small", "many-small", "--optimizers", "rmsprop",
               "adagrad", "lion", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch.optim.RMSprop has no fused implementation" in text
    res = json.loads((tmp_path / "results.json").read_text())
    cells = {(r["preset"], r["optimizer"], r["impl"]): r for r in res["results"]}
    impls = ["fusedopt", "torch-forloop", "torch-foreach", "torch-fused"]
    expect = {(p, o, i) for p in ("gpt2-small", "many-small") for o in ("rmsprop", "adagrad") for i in impls}
    expect |= {(p, "lion", "fusedopt") for p in ("gpt2-small", "many-small")}
    assert set(cells) == expect
    for key, r in cells.items():
        assert r["bytes_per_element"] == 20
        if key[1] == "rmsprop" and key[2] == "torch-fused":
            assert r["status"] == "n/a"
        else:
            assert r["status"] == "ok", (key, r.get("reason"))
            if key[2] != "fusedopt":
                assert r["fusedopt_speedup"] > 0
    assert any("no Lion" in n for n in res["notes"])
    assert "-" * 5 in text  # a plain table (no precision columns)
    assert not any("B/elem" in line and "ms/step" in line for line in text.splitlines())


def test_cli_precision_flag_and_bad_values(tmp_path):
    rc = main(["--quick", "--devices", "cpu", "--presets", "huge", "--dtypes", "bf16", "fp32", "--optimizers", "lion",
               "--precision", "master", "sr", "--reps", "1", "--warmup", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    recs = {(r["dtype"], r["impl"]): r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert set(recs) == {(d, i) for d in ("bf16", "fp32") for i in ("fusedopt", "fusedopt:master", "fusedopt:sr")}
    assert recs[("bf16", "fusedopt:master")]["status"] == "ok"
    assert recs[("bf16", "fusedopt:master")]["bytes_per_element"] == 16   # p 0+2, g 2, M 8, m 2+2
    assert recs[("fp32", "fusedopt:master")]["status"] == "n/a"
    assert "16-bit" in recs[("fp32", "fusedopt:sr")]["reason"]
    with pytest.raises(SystemExit):
        main(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        main(["--optimizers", "lamb"])
