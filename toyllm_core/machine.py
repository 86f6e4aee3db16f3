"""What every benchmark JSON records about where it ran: the CPU model (lscpu's "Model name"), the
core count, the load average and the JAX version; and this process's peak resident memory. Standard library only, so that HTTP-side tools
(`toyllm loadtest`, the admission benchmark) can record it without importing JAX."""

from __future__ import annotations

import os
import resource
import subprocess
from importlib import metadata


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def machine() -> dict:
    try:
        jax_version = metadata.version("jax")
    except metadata.PackageNotFoundError:
        jax_version = None
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
            "jax": jax_version}


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the kernel's per-process limit vm.max_map_count), on Linux.
    XLA's CPU backend maps every compiled kernel separately (~180 maps per serving program), so the
    programs a server compiles count against the limit; past it, the next compile crashes."""
    try:
        with open("/proc/self/maps") as f:
            held = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return held, int(f.read())
    except (OSError, ValueError):
        return None
