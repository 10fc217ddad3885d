"""LinearWarmup: the warmup itself and the hand-over convention to `after`.

Convention under test: `after` is built first on the same optimizer; the warmup
owns the lr for t < W (after's constructor side effects are overwritten and it is
not stepped); after's base lrs become end_lr; at t = W the group lrs are set to
end_lr and `after` restarts at its own step 0, so lr(t) = after_lr(t - W).
"""

import math

import pytest
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau

from fusedopt.lr_scheduler import LinearWarmup

START = (0.0, 0.001)
END = (0.05, 0.02)


def flat(rows):
    return [x for row in rows for x in row]


def warm(t, w, g):
    return START[g] + (END[g] - START[g]) * t / w


def test_holds_end_lr_without_after(make_optimizer, run):
    opt = make_optimizer()
    sched = LinearWarmup(opt, warmup_steps=10, start_lr=list(START), end_lr=list(END))
    traj = run(opt, sched, 30)
    for t, row in enumerate(traj):
        for g in range(2):
            want = warm(t, 10, g) if t < 10 else END[g]
            assert row[g] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, g)
    assert traj[0] == [0.0, 0.001]
    assert traj[9] == pytest.approx([0.045, 0.0181])
    assert traj[10] == [0.05, 0.02]


def test_scalar_start_end_apply_to_every_group(make_optimizer, run):
    opt = make_optimizer()
    sched = LinearWarmup(opt, warmup_steps=4, start_lr=0.01, end_lr=0.05)
    traj = run(opt, sched, 6)
    assert flat(traj) == pytest.approx(flat([[0.01] * 2, [0.02] * 2, [0.03] * 2, [0.04] * 2, [0.05] * 2, [0.05] * 2]))


def test_hand_over_to_cosine_annealing(make_optimizer, run):
    opt = make_optimizer()  # group lrs 0.1 / 0.03: end_lr differs on purpose
    after = CosineAnnealingLR(opt, T_max=20, eta_min=0.001)
    sched = LinearWarmup(opt, warmup_steps=8, start_lr=list(START), end_lr=list(END), after=after)
    # The warmup owns the lr from construction on, after is rebased on end_lr.
    assert [g["lr"] for g in opt.param_groups] == list(START)
    assert after.base_lrs == list(END)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.03]

    traj = run(opt, sched, 60)  # runs past W + T_max: torch's cosine goes back up
    for t, row in enumerate(traj):
        for g in range(2):
            if t < 8:
                want = warm(t, 8, g)
            else:
                want = 0.001 + (END[g] - 0.001) * (1 + math.cos(math.pi * (t - 8) / 20)) / 2
            assert row[g] == pytest.approx(want, rel=1e-9, abs=1e-15), (t, g)
    assert traj[7] == pytest.approx([0.04375, 0.017625])
    assert traj[8] == pytest.approx(list(END))  # hand-over: after's step 0 = end_lr
    assert traj[28] == pytest.approx([0.001, 0.001])  # W + T_max
    assert after.last_epoch == 59 - 8


def test_hand_over_to_linear_lr_overwrites_its_construction(make_optimizer, run):
    opt = make_optimizer()
    after = LinearLR(opt, start_factor=0.25, total_iters=4)  # scales the group lrs right away
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.0075])
    sched = LinearWarmup(opt, warmup_steps=5, start_lr=0.0, end_lr=0.08, after=after)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    traj = run(opt, sched, 15)
    for t, row in enumerate(traj):
        want = 0.08 * t / 5 if t < 5 else 0.08 * (0.25 + 0.75 * min(t - 5, 4) / 4)
        assert row == pytest.approx([want, want], rel=1e-12, abs=1e-15), t
    assert traj[5] == pytest.approx([0.02, 0.02])  # LinearLR's own step 0: end_lr * start_factor


def plateau_metrics(t):
    # Very good metrics during the warmup must be ignored: if the plateau had seen
    # 0.0 as its best, 1.0 would count as bad from step 6 on and reduce at step 7.
    if t <= 5:
        return 0.0
    if t <= 12:
        return 1.0
    return 0.5


def test_hand_over_to_reduce_lr_on_plateau(make_optimizer, run):
    opt = make_optimizer()
    after = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    sched = LinearWarmup(opt, warmup_steps=5, start_lr=list(START), end_lr=list(END), after=after)
    traj = run(opt, sched, 16, metrics=plateau_metrics)
    e0, e1 = END
    expected = [[warm(t, 5, 0), warm(t, 5, 1)] for t in range(5)] + [
        [e0, e1],  # 5: hand-over, metric ignored
        [e0, e1],  # 6: first metric 1.0 -> best
        [e0, e1],  # 7: 1 bad epoch (patience 1)
        [e0 / 2, e1 / 2],  # 8: 2 bad epochs -> reduce
        [e0 / 2, e1 / 2],  # 9
        [e0 / 4, e1 / 4],  # 10
        [e0 / 4, e1 / 4],  # 11
        [e0 / 8, e1 / 8],  # 12
        [e0 / 8, e1 / 8],  # 13: 0.5 improves -> best, no bad epoch
        [e0 / 8, e1 / 8],  # 14: 1 bad epoch
        [e0 / 16, e1 / 16],  # 15: reduce
    ]
    assert len(traj) == len(expected)
    assert flat(traj) == pytest.approx(flat(expected), rel=1e-12, abs=1e-15)
    assert after.last_epoch == 15 - 5
    assert after.best == 0.5


def test_plateau_requires_metrics_after_warmup(make_optimizer, run):
    opt = make_optimizer()
    after = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    sched = LinearWarmup(opt, warmup_steps=3, start_lr=0.0, end_lr=0.05, after=after)
    run(opt, sched, 4)  # no metrics needed up to and including the hand-over (t = 3)
    assert sched.last_epoch == 3
    opt.step()
    with pytest.raises(TypeError, match=r"pass the metric"):
        sched.step()
    # the failed step changed nothing
    assert sched.last_epoch == 3 and after.last_epoch == 0
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    sched.step(2.0)
    assert sched.last_epoch == 4 and after.last_epoch == 1


def test_closed_form_jump_past_warmup(make_optimizer, run):
    opt = make_optimizer()
    after = CosineAnnealingLR(opt, T_max=20)
    sched = LinearWarmup(opt, warmup_steps=8, start_lr=0.0, end_lr=0.05, after=after)
    opt.step()
    with pytest.warns(UserWarning, match="epoch parameter"):
        sched.step(epoch=15)
    traj = run(opt, sched, 10, t0=15)  # then keeps stepping one step at a time
    for i, row in enumerate(traj):
        want = 0.05 * (1 + math.cos(math.pi * (15 + i - 8) / 20)) / 2
        assert row == pytest.approx([want, want], rel=1e-9), 15 + i
    assert after.last_epoch == 24 - 8


def test_closed_form_jump_needs_closed_form_after(make_optimizer):
    opt = make_optimizer()
    sched = LinearWarmup(opt, 3, 0.0, 0.05, after=ReduceLROnPlateau(opt))
    opt.step()
    with pytest.warns(UserWarning), pytest.raises(TypeError, match=r"ReduceLROnPlateau has no closed form"):
        sched.step(epoch=10)
    assert sched.last_epoch == 0


def test_state_dict_contains_after_state(make_optimizer, run):
    opt = make_optimizer()
    after = CosineAnnealingLR(opt, T_max=20)
    sched = LinearWarmup(opt, warmup_steps=4, start_lr=0.0, end_lr=0.05, after=after)
    run(opt, sched, 10)
    state = sched.state_dict()
    assert state["last_epoch"] == 9
    assert state["after"]["last_epoch"] == 5
    assert state["after"]["base_lrs"] == [0.05, 0.05]
    assert "optimizer" not in state and "optimizer" not in state["after"]


def test_load_state_dict_rejects_missing_after(make_optimizer):
    opt = make_optimizer()
    with_after = LinearWarmup(opt, 4, 0.0, 0.05, after=CosineAnnealingLR(opt, T_max=20))
    opt2 = make_optimizer()
    without = LinearWarmup(opt2, 4, 0.0, 0.05)
    with pytest.raises(ValueError, match=r"has no `after` scheduler|has one"):
        with_after.load_state_dict(without.state_dict())
