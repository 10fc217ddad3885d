import os
import sys
from pathlib import Path

import pytest
import torch

import fusedopt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/emulated_cuda.py

import emulated_cuda  # noqa: E402


def pytest_report_header(config):
    ext = "loaded" if fusedopt.extension_available() else fusedopt.extension_error()
    return f"fusedopt extension: {ext}; torch {torch.__version__}; CUDA device: {torch.cuda.is_available()}"


@pytest.fixture(scope="session")
def emulated_cuda_module():
    """The emulated CUDA backend, built once per session. Without CUDA headers the emulated
    tests are skipped, unless FUSEDOPT_REQUIRE_EMULATION=1 (CI) makes that a failure."""
    if not fusedopt.extension_available():
        pytest.skip("needs the compiled extension")
    if emulated_cuda.cuda_include_dirs() is None:
        msg = "emulated CUDA needs the CUDA toolkit headers (set CUDA_HOME)"
        if os.environ.get("FUSEDOPT_REQUIRE_EMULATION", "") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return emulated_cuda.build()


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """Tests marked emulated_cuda (the "emul" device entries) run with the fused ops routed
    through the emulated CUDA kernels; the marker's kwargs configure the emulation."""
    marker = request.node.get_closest_marker("emulated_cuda")
    if marker is None:
        yield None
        return
    module = request.getfixturevalue("emulated_cuda_module")
    with emulated_cuda.emulated(module, **marker.kwargs):
        yield module


def pytest_runtest_logreport(report):
    """With FUSEDOPT_TEST_LOG=PATH, one line per test phase that failed and per test call, written
    as it happens: outcome, seconds, node id. (scripts/gpu_check.sh uses it: a run cut short by its
    time limit still says which tests failed and which were slow.)"""
    path = os.environ.get("FUSEDOPT_TEST_LOG")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller gets every worker's reports: it writes them once
    if path and (report.when == "call" or report.outcome == "failed"):
        with open(path, "a") as f:
            f.write(f"{report.outcome}\t{report.duration:.2f}\t{report.when}\t{report.nodeid}\n")
