"""Where a benchmark ran: device names, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["cpu_name", "device_name", "git_commit", "environment"]


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux) or ``platform``, with the core count."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({os.cpu_count()} logical cores)"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return cpu_name()


def git_commit() -> dict:
    """{"commit": sha or None, "dirty": bool or None} for the checkout holding this package."""
    root = Path(__file__).resolve().parents[2]
    out = {"commit": None, "dirty": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            out["commit"] = sha.stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True, timeout=10)
        if st.returncode == 0:
            out["dirty"] = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def environment() -> dict:
    try:
        import fusedopt
        fo_version = getattr(fusedopt, "__version__", None)
        avail = getattr(fusedopt, "extension_available", None)
        ext = bool(avail()) if callable(avail) else None
    except Exception as e:  # pragma: no cover - only while the package is half built
        fo_version, ext = f"import failed: {e}", False
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_num_threads": torch.get_num_threads(),
        "fusedopt": fo_version,
        "fusedopt_extension_available": ext,
        "git": git_commit(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu": cpu_name(),
        "cuda_devices": [device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
