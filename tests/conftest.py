import torch

import fusedopt


def pytest_report_header(config):
    ext = "loaded" if fusedopt.extension_available() else fusedopt.extension_error()
    return f"fusedopt extension: {ext}; torch {torch.__version__}; CUDA device: {torch.cuda.is_available()}"
