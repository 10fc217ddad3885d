"""What the installed torch.optim can serve as the oracle for (pyproject allows torch >= 2.6)."""

import functools

import pytest
import torch


@functools.cache
def adagrad_makes_state_at_step() -> bool:
    """Whether torch.optim.Adagrad makes a missing state at the step, as the other optimizers and
    fusedopt do. Older torch (2.11 was seen) makes it only in __init__: a step after a param's
    state was reset, or for a param of a group added later, raises KeyError 'sum' there."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adagrad([p])
    opt.state.clear()
    p.grad = torch.ones(1)
    try:
        opt.step()
    except KeyError:
        return False
    return True


def has_oracle_for_missing_state(name: str) -> bool:
    """Whether torch's `name` can step a param whose state is missing after its first step."""
    return name != "Adagrad" or adagrad_makes_state_at_step()


def require_oracle_for_missing_state(name: str) -> None:
    if not has_oracle_for_missing_state(name):
        pytest.skip(f"torch {torch.__version__}'s Adagrad makes its state only in __init__ and "
                    "raises KeyError for a missing one: no oracle for re-creating it at the step")
