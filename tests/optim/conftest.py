"""Shared pytest configuration for the fusedopt parity suite (tests/optim).

Every parity test takes the ``device`` fixture, so it runs once per entry of ``DEVICES``:
always on CPU, on the emulated CUDA kernels (id "emul"), and on CUDA when a GPU is visible.  Tests that only make sense
with a GPU are marked ``@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")``.

The oracle everywhere is ``torch.optim.<Name>(..., foreach=False)``: torch's for-loop
("single tensor") implementation, which is the readable reference semantics.
"""

import pathlib
import sys

import pytest
import torch

_HERE = pathlib.Path(__file__).resolve().parent
# The helper module lives next to this file; make it importable under every pytest import mode.
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

try:  # Prefer an installed fusedopt; fall back to the source checkout (python -m pytest does that too).
    import fusedopt  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the suite is launched
    sys.path.insert(0, str(_HERE.parent.parent))

from emulated_cuda import DEVICES  # noqa: E402  ("cpu", "emul": the emulated CUDA kernels, "cuda")


@pytest.fixture(params=DEVICES)
def device(request):
    """Device every parity test runs on: 'cpu'; 'emul' (CPU tensors, the fused ops run by the
    CUDA kernels emulated on the CPU); 'cuda' where a GPU exists."""
    return request.param


@pytest.fixture(autouse=True)
def _deterministic_torch_state():
    """Each test starts from the same global RNG state and default dtype (tests use their own
    seeded torch.Generator for all data, this only guards against leakage between tests)."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def two_threads():
    """torch's intra-op pool at two threads for the test (the CPU kernels split work by thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def pytest_report_header(config):
    try:
        import fusedopt

        avail = getattr(fusedopt, "extension_available", None)
        avail = avail() if callable(avail) else avail
        return [f"fusedopt: {fusedopt.__file__} (extension available: {avail}); devices: {DEVICES}"]
    except Exception as e:  # pragma: no cover
        return [f"fusedopt: import failed: {e!r}"]
