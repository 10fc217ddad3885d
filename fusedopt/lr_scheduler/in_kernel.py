"""In-kernel learning-rate schedules: the fused kernel computes the lr from its own step count.

A host scheduler (torch's or fusedopt's) runs in Python after every step; under a captured CUDA
graph it cannot run at all, and under ``torch.compile`` a float lr that changes recompiles. With
``in_kernel(scheduler)`` a closed-form schedule is handed to the fused kernel instead::

    opt = fusedopt.AdamW(model.parameters(), lr=3e-4)
    sched = fusedopt.lr_scheduler.in_kernel(
        fusedopt.lr_scheduler.WarmupCosine(opt, warmup_steps=100, total_steps=10_000))
    for batch in data:
        loss(batch).backward()
        opt.step()        # uses lr(t), then advances t and stores lr(t + 1) in group["lr"]
        sched.step()      # allowed and does nothing: the kernel already advanced the schedule
        opt.zero_grad()

Each step uses lr(t) where t counts the optimizer's completed steps (a step skipped by GradScaler
does not count; one in which no param has a grad does, on the host), so the trajectory is the host
scheduler's. ``group["lr"]`` becomes a tensor the
kernel writes, so reading it (or ``get_last_lr()``) synchronizes on CUDA. The kernel never reads
an lr set by hand, so ``group["lr"] = x`` with another value than the schedule's raises
ValueError at the next step (an lr put back by ``load_state_dict`` of the optimizer, with the
schedule's own state loaded too, is the schedule's and is taken). Writing another value into the
tensor in place, as every torch.optim.lr_scheduler stepping the same optimizer does, raises
ValueError at the next step too (its version counter says it was written). An lr set to 0 steps its group with lr 0 and keeps the schedule
(see ``kernel_args``: torch.distributed.checkpoint's state initialisation does that). No host work happens
per step for the lr, and a whole training step captured in a CUDA graph follows the schedule
across replays. Schedules without a closed form (LambdaLR, ReduceLROnPlateau, ...) stay on the
host: ``in_kernel`` raises TypeError for them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedopt.lr_scheduler.phases import evaluate_phases, kernel_phases


class InKernelSchedule:
    """A closed-form schedule evaluated by a fusedopt optimizer's fused kernel.

    Create it with :func:`in_kernel`. It mirrors the parts of the ``LRScheduler`` API a training
    loop uses: ``step()`` (a no-op), ``get_last_lr()``, ``last_epoch``, ``state_dict()`` /
    ``load_state_dict()``; ``mode`` is ``"in-kernel"``.
    """

    mode = "in-kernel"

    def __init__(self, scheduler) -> None:
        optimizer = scheduler.optimizer
        if not hasattr(optimizer, "_attach_kernel_schedule"):
            raise TypeError(
                f"in_kernel needs a fusedopt optimizer (fusedopt.SGD, Adam, AdamW, RMSprop, Adagrad or Lion), got "
                f"{type(optimizer).__module__}.{type(optimizer).__name__}; a torch.optim optimizer "
                "keeps its schedule on the host"
            )
        kernel_phases(scheduler)  # TypeError for schedules without a closed form
        devices = {p.device for g in optimizer.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"in_kernel supports optimizers whose params live on one device, got {sorted(map(str, devices))}"
            )
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.device = devices.pop() if devices else torch.device("cpu")
        self._read_phases()
        start = max(int(scheduler.last_epoch), 0)
        self._counter = torch.tensor([start], dtype=torch.int64, device=self.device)
        # The kernel writes the next step's lr into these; they replace the float lrs.
        self._lrs: list[Tensor] = []
        for group, group_phases in zip(optimizer.param_groups, self.phases):
            group["lr"] = torch.tensor(evaluate_phases(group_phases, start), dtype=torch.float64,
                                       device=self.device)
            self._lrs.append(group["lr"])
        # Each lr tensor's version after this schedule last wrote it (the kernel's writes bump
        # none): a bump since is a write in place by someone else (a torch scheduler's fill_).
        self._lr_versions = [lr._version for lr in self._lrs]
        self._paused: set[int] = set()  # groups whose last step ran with an lr of 0 set by hand
        # An optimizer state_dict loaded before this schedule's own state was: the next step must
        # not run until the schedule's is loaded too (its lrs alone do not say where it was).
        self._schedule_loaded = False
        self._awaiting_schedule_state = False
        optimizer.register_load_state_dict_post_hook(self._optimizer_loaded)
        optimizer._attach_kernel_schedule(self)

    def _optimizer_loaded(self, optimizer) -> None:
        if not self._schedule_loaded:
            self._awaiting_schedule_state = True

    def _read_phases(self) -> None:
        """The schedule's phases (from its base lrs and settings) as the kernel's table."""
        self.phases = kernel_phases(self.scheduler)
        rows: list[list[float]] = []
        self.group_rows: list[tuple[int, int]] = []
        for group_phases in self.phases:
            self.group_rows.append((len(rows), len(group_phases)))
            rows.extend([float(v) for v in phase] for phase in group_phases)
        self.table = torch.tensor(rows, dtype=torch.float64).reshape(-1, 8)

    # -- what the optimizer passes to its op ---------------------------------------------------

    def kernel_args(self) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]] | None:
        """(phase table, schedule_state = [counter, lr tensors], (begin, count) per group), or
        None: every group's lr is set to 0 for this step, which then is not the schedule's.

        A group whose lr is set to 0 in place of the schedule's tensor steps with lr 0 and keeps
        its schedule: that is how torch.distributed.checkpoint's get_state_dict makes the state
        of an optimizer that never stepped (one step on zero grads, every lr 0, then the lrs put
        back), and how a run pauses a group. With every group at 0 the schedule does not advance."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self._lrs):
            raise ValueError(
                f"fusedopt.lr_scheduler.in_kernel: the optimizer has {len(groups)} param groups but its "
                f"in-kernel schedule was made for {len(self._lrs)}; make the schedule (and call "
                "in_kernel) after add_param_group")
        if self._awaiting_schedule_state:
            raise ValueError(
                "fusedopt.lr_scheduler.in_kernel: the optimizer's state_dict was loaded but not the "
                f"in-kernel schedule's ({type(self.scheduler).__name__}): the schedule would restart from "
                "its first step. Load the schedule's state_dict too (either order), or keep the schedule "
                "on the host")
        lrs, rows = [], []
        for i, group in enumerate(groups):
            lr = group["lr"]
            if lr is not self._lrs[i]:
                if float(lr) == 0.0:
                    # a pause (or torch.distributed.checkpoint's zero-lr step), whatever the
                    # schedule's own lr: the tracked tensor is kept for when it is put back
                    self._paused.add(i)
                    rows.append((0, 0))  # read from the group, as without a schedule
                    continue
                self._adopt_lr(i, group)
            elif i in self._paused:  # put back after a pause: the lr it holds is from before it
                lr.fill_(evaluate_phases(self.phases[i], self.last_epoch))
                self._wrote(i)
            elif lr._version != self._lr_versions[i]:
                self._check_written(i)
            self._paused.discard(i)
            lrs.append(self._lrs[i])
            rows.append(self.group_rows[i])
        if not lrs:
            return None
        return self.table, [self._counter] + lrs, rows

    def _adopt_lr(self, i: int, group: dict) -> None:
        """Group i's lr was replaced (by hand, or by an optimizer state_dict load): taken when it is
        the schedule's lr at its step, as a loaded lr is once the schedule's state is loaded too;
        anything else the kernel would silently ignore, so it raises."""
        lr = group["lr"]
        t = self.last_epoch
        expected = evaluate_phases(self.phases[i], t)
        value = float(lr)
        if not math.isclose(value, expected, rel_tol=1e-6, abs_tol=0.0):
            raise ValueError(
                f"fusedopt.lr_scheduler.in_kernel: param_groups[{i}]['lr'] was set to {value:.6g}, but "
                f"the in-kernel schedule ({type(self.scheduler).__name__}) computes every step's lr "
                f"from its step count (step {t}: lr {expected:.6g}) and would ignore it. To resume a "
                "run, load the schedule's state_dict as well as the optimizer's; to set the lr by "
                "hand, keep the schedule on the host (do not call in_kernel)")
        if not (torch.is_tensor(lr) and lr.device == self.device and lr.dtype == torch.float64
                and not lr.is_inference()):
            lr = group["lr"] = torch.tensor(value, dtype=torch.float64, device=self.device)
        self._lrs[i] = lr
        self._wrote(i)

    def _check_written(self, i: int) -> None:
        """Group i's lr tensor was written in place since this schedule last wrote it: fine when
        it holds the schedule's lr (a scheduler that wrote the same value), else the kernel would
        silently overwrite it, so it raises."""
        t = self.last_epoch
        expected = evaluate_phases(self.phases[i], t)
        value = float(self._lrs[i])
        if not math.isclose(value, expected, rel_tol=1e-6, abs_tol=0.0):
            raise ValueError(
                f"fusedopt.lr_scheduler.in_kernel: param_groups[{i}]['lr'] was changed in place to "
                f"{value:.6g} (every torch.optim.lr_scheduler writes a tensor lr in place: is another "
                f"scheduler stepping this optimizer?), but the in-kernel schedule "
                f"({type(self.scheduler).__name__}) computes every step's lr from its step count "
                f"(step {t}: lr {expected:.6g}) and would overwrite it. Step one schedule: this one, or "
                "keep them all on the host (do not call in_kernel)")
        self._wrote(i)

    def _wrote(self, i: int) -> None:
        self._lr_versions[i] = self._lrs[i]._version

    def advance(self) -> None:
        """Counts a step that ran no kernel (no param had a grad), as the host scheduler's
        ``step()`` would: t advances and the groups' lrs become lr(t + 1) (unless every group's lr
        is set to 0: see kernel_args)."""
        if self.kernel_args() is None:
            return
        t = self.last_epoch + 1
        self._counter.fill_(t)
        for i, (group_phases, group, lr) in enumerate(zip(self.phases, self.optimizer.param_groups, self._lrs)):
            if group["lr"] is lr:
                lr.fill_(evaluate_phases(group_phases, t))
                self._wrote(i)

    # -- the LRScheduler-like surface ----------------------------------------------------------

    def step(self, *args, **kwargs) -> None:
        """Does nothing: the fused kernel advances the schedule with every optimizer step."""

    @property
    def last_epoch(self) -> int:
        """The schedule step the next optimizer step will use (reading it synchronizes)."""
        return int(self._counter.item())

    def get_last_lr(self) -> list[float]:
        """The lr each group will use at the next step (reading it synchronizes). A group's lr
        tensor put back after a pause still holds the lr from before it until that step runs;
        this gives the schedule's."""
        out = []
        for i, g in enumerate(self.optimizer.param_groups):
            if i in self._paused and i < len(self._lrs) and g["lr"] is self._lrs[i]:
                out.append(evaluate_phases(self.phases[i], self.last_epoch))
            else:
                out.append(float(g["lr"]))
        return out

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._schedule_loaded = True
        self._awaiting_schedule_state = False
        self._paused.clear()
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._read_phases()  # from the loaded base lrs, which may differ from this run's first lrs
        t = int(state_dict["last_epoch"])
        self._counter.fill_(t)
        for i, (group, group_phases) in enumerate(zip(self.optimizer.param_groups, self.phases)):
            lr = group["lr"]
            if not (torch.is_tensor(lr) and lr.device == self.device and lr.dtype == torch.float64):
                lr = group["lr"] = torch.tensor(0.0, dtype=torch.float64, device=self.device)
            lr.fill_(evaluate_phases(group_phases, t))
            self._lrs[i] = lr
            self._wrote(i)

    def __repr__(self) -> str:
        return (f"InKernelSchedule({type(self.scheduler).__name__}, mode='in-kernel': the lr is "
                f"computed by the fused kernel from its step count)")


def in_kernel(scheduler) -> InKernelSchedule:
    """Hand a closed-form ``scheduler`` over to its fusedopt optimizer's fused kernel.

    From then on the kernel evaluates the schedule at every step from its own step count; the
    host scheduler is no longer stepped. Raises TypeError for a scheduler without a closed form
    (it stays on the host) or an optimizer that is not fusedopt's.
    """
    return InKernelSchedule(scheduler)
