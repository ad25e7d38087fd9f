"""Provenance of a recorded run: the machine, the software versions, checkpoint hashes and timing.

``benchmarks/results.py`` and ``python -m open_clip_spiking.demo`` store these next to their figures,
so that every number can be traced to the hardware and software that produced it.
"""
import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# Packages whose versions a results file records.
SOFTWARE = ("torch", "torchvision", "open_clip_torch", "timm", "spikingjelly", "webdataset", "transformers",
            "clip-benchmark", "open_clip_spiking")


def now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_text(command: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    """Return the standard output of a short command, or None when it fails or is not installed."""
    try:
        result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


def cpu_model() -> str:
    """Return the CPU model name that ``lscpu`` reports, or the platform's processor string."""
    for line in (run_text(["lscpu"]) or "").splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> Optional[float]:
    """Return the total memory in GiB from ``/proc/meminfo``, or None where it is unreadable."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        return None
    return None


def load_average() -> Optional[List[float]]:
    """Return the 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def collect_hardware(device: str) -> Dict[str, Any]:
    """Describe the machine: ``lscpu`` model name, core counts, memory, threads and accelerator."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "load_average_start": load_average(),
    }


def collect_software(packages: Sequence[str] = SOFTWARE) -> Dict[str, Optional[str]]:
    """Return the versions of Python and of ``packages`` (None for a package that is not installed)."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def sha256(path: Path) -> str:
    """Return the SHA-256 of a file as a hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_duration(seconds: Optional[float]) -> str:
    """Format seconds as ``12.3 s`` below a minute and ``4 min 5 s`` from a minute on; None as ``-``."""
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"
