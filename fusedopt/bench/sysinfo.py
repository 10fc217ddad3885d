"""Where a benchmark ran: device names, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["cpu_name", "device_name", "git_commit", "environment", "other_cpu_busy", "other_cpu_busy_at_start"]


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


def git_commit(root: Path | None = None) -> dict:
    """{"commit": sha or None, "dirty": bool or None} for the fusedopt checkout holding this package
    (``root``: the checkout's top directory); both None for an installed copy (inside someone
    else's repository, say)."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root).resolve()
    out = {"commit": None, "dirty": None}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return out
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


def other_cpu_busy(interval: float = 0.5) -> float | None:
    """Fraction (0-1) of all CPU time used during ``interval`` seconds while this process sleeps,
    i.e. by *other* processes, from /proc/stat (Linux); None where that is not available.

    Unlike the load average (a one-minute moving average), this sees the present.
    """
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    return max(0.0, (total - (i1 - i0)) / total) if total > 0 else None


_BUSY_AT_START: list[float | None] = []


def other_cpu_busy_at_start() -> float | None:
    """other_cpu_busy() sampled once per process: the figure a run warns about is the one its
    results record."""
    if not _BUSY_AT_START:
        _BUSY_AT_START.append(other_cpu_busy())
    return _BUSY_AT_START[0]


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
        "other_cpu_busy_at_start": other_cpu_busy_at_start(),
        "cpu": cpu_name(),
        "cuda_devices": [device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
