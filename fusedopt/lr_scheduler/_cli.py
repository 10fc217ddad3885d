"""``python -m fusedopt.lr_scheduler plot ...`` and the safe schedule-spec parser.

A spec looks like a constructor call without the optimizer, keyword arguments only::

    WarmupCosine(warmup_steps=100, total_steps=1000)
    StepLR(step_size=200, gamma=0.5)
    LinearWarmup(warmup_steps=50, start_lr=0.0, end_lr=0.1, after=CosineAnnealingLR(T_max=950))
    SequentialLR(schedulers=[LinearLR(total_iters=10), ExponentialLR(gamma=0.99)], milestones=[10])

It is parsed with :mod:`ast`, never evaluated: the called name must be a known
scheduler class of ``fusedopt.lr_scheduler`` or ``torch.optim.lr_scheduler``,
and every argument value a Python literal (``ast.literal_eval``), a nested
scheduler spec, or a list/tuple of those.  Nested schedulers are built first, on
the same optimizer, in the order they appear.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as tls

__all__ = ["known_schedulers", "parse_schedule", "main"]


def known_schedulers() -> dict[str, type]:
    """Scheduler classes a spec may name: fusedopt's first, then torch's public ones."""
    from fusedopt.lr_scheduler import schedulers as fs

    known: dict[str, type] = {name: getattr(fs, name) for name in fs.__all__}
    for name in tls.__all__:
        cls = getattr(tls, name, None)
        if (
            isinstance(cls, type)
            and issubclass(cls, tls.LRScheduler)
            and cls is not tls.LRScheduler
            and not name.startswith("_")
        ):
            known.setdefault(name, cls)
    return known


# Parsed spec nodes: ("call", cls, {kw: node}) | ("list", [node], is_tuple) | ("lit", value)
_Node = tuple


def _parse_value(node: ast.AST, spec: str) -> _Node:
    if isinstance(node, ast.Call):
        return _parse_call(node, spec)
    if isinstance(node, (ast.List, ast.Tuple)) and any(isinstance(n, ast.Call) for n in ast.walk(node)):
        return ("list", [_parse_value(e, spec) for e in node.elts], isinstance(node, ast.Tuple))
    try:
        return ("lit", ast.literal_eval(node))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(
            f"In schedule {spec!r}: argument values must be Python literals (numbers, strings, "
            f"True/False/None, lists, tuples, dicts) or scheduler specs, but got {ast.unparse(node)!r}"
        ) from None


def _parse_call(node: ast.AST, spec: str) -> _Node:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(
            f"Expected a schedule like 'StepLR(step_size=10, gamma=0.5)', but got {spec!r}"
        )
    name = node.func.id
    known = known_schedulers()
    if name not in known:
        raise ValueError(
            f"Unknown scheduler {name!r} in schedule {spec!r}; known schedulers: {', '.join(sorted(known))}"
        )
    if node.args:
        raise ValueError(
            f"In schedule {spec!r}: {name} takes keyword arguments only (the optimizer is supplied), "
            f"e.g. {name}(step_size=10)"
        )
    kwargs: dict[str, _Node] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"In schedule {spec!r}: '**' arguments are not allowed")
        if kw.arg == "optimizer":
            raise ValueError(f"In schedule {spec!r}: the optimizer is supplied, don't pass optimizer=")
        kwargs[kw.arg] = _parse_value(kw.value, spec)
    return ("call", known[name], kwargs)


def _build(node: _Node, optimizer: Optimizer) -> Any:
    tag = node[0]
    if tag == "lit":
        return node[1]
    if tag == "list":
        items = [_build(n, optimizer) for n in node[1]]
        return tuple(items) if node[2] else items
    _, cls, kwargs = node
    built = {key: _build(value, optimizer) for key, value in kwargs.items()}  # nested ones first
    return cls(optimizer=optimizer, **built)


def parse_schedule(spec: str) -> Callable[[Optimizer], tls.LRScheduler]:
    """Parse a schedule spec into a factory ``optimizer -> scheduler``.

    The spec is checked (syntax, known class names, literal arguments) right
    away; the scheduler's own argument validation runs when the factory is
    called.

    Args:
        spec (str): e.g. ``"WarmupCosine(warmup_steps=100, total_steps=1000)"``.

    Returns:
        Callable[[Optimizer], LRScheduler]: builds the scheduler on the given optimizer.

    Raises:
        ValueError: the spec is not a call of a known scheduler with literal
            keyword arguments.
    """
    if not isinstance(spec, str):
        raise TypeError(f"Expected a str schedule spec, but got {type(spec).__name__}")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"Cannot parse schedule {spec!r}: {e.msg}") from None
    node = _parse_call(tree.body, spec)

    def factory(optimizer: Optimizer) -> tls.LRScheduler:
        return _build(node, optimizer)

    return factory


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt.lr_scheduler",
        description="Tools for fusedopt learning-rate schedulers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "plot",
        help="plot learning rate against step into a PNG",
        description="Plot learning rate against step for one or several schedules into a PNG.",
        epilog='example: python -m fusedopt.lr_scheduler plot --schedule "WarmupCosine(warmup_steps=100,'
        'total_steps=1000)" --schedule "StepLR(step_size=200,gamma=0.5)" --lr 0.1 --steps 1000 --out lr.png',
    )
    p.add_argument(
        "--schedule",
        action="append",
        required=True,
        metavar="SPEC",
        help="scheduler constructor call without the optimizer, keyword arguments only, "
        'e.g. "StepLR(step_size=200,gamma=0.5)"; repeat for several lines',
    )
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--steps", type=int, default=1000, help="number of steps to plot (default: 1000)")
    p.add_argument("--out", default="lr.png", help="output PNG path (default: lr.png)")
    p.add_argument("--title", default=None, help="figure title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from fusedopt.lr_scheduler._plot import plot

    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        factories = [(spec, parse_schedule(spec)) for spec in args.schedule]
        plot(factories, args.steps, args.out, lr=args.lr, title=args.title)
    except (ValueError, TypeError, OSError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ArithmeticError, LookupError) as e:
        # what a scheduler raises for arguments it takes but cannot run with (torch's
        # StepLR(step_size=0) divides by zero, a last_epoch without initial_lr is a KeyError)
        print(f"{parser.prog} {args.command}: error: a schedule cannot run with these arguments "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
