"""Benchmark harness for fusedopt (``python -m fusedopt.bench`` / ``fusedopt-bench``).

Modules:

- :mod:`fusedopt.bench.bytes_model` - bytes an optimizer step must move (effective GB/s).
- :mod:`fusedopt.bench.presets` - model-shaped parameter lists (gpt2-small, many-small, huge, llama).
- :mod:`fusedopt.bench.optimizers` - optimizer configs x implementations and their factory.
- :mod:`fusedopt.bench.timing` - step timers (perf_counter / CUDA events), CUDA-graph capture,
  streaming-bandwidth reference.
- :mod:`fusedopt.bench.runner` - the grid and the results dict.
- :mod:`fusedopt.bench.report` - text / Markdown tables, results.json, results.png.
"""

from fusedopt.bench.bytes_model import bytes_per_element, step_bytes  # noqa: F401

__all__ = ["bytes_per_element", "step_bytes"]
