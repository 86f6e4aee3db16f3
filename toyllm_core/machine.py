"""What every benchmark JSON records about where it ran: the CPU model (lscpu's "Model name"), the
core count, the load average and the JAX version; and this process's memory: its resident peak by
phase, the heap it can give back, its memory maps. Standard library only, so that HTTP-side tools
(`toyllm loadtest`, the admission benchmark) can record it without importing JAX."""

from __future__ import annotations

import ctypes
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


def _status_bytes(field: str) -> int | None:
    """A "VmXXX: n kB" line of /proc/self/status, in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started, or since the last
    `reset_peak_rss` (the kernel's high-water mark, VmHWM)."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int | None:
    """The resident memory this process holds now."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Start a new phase of `peak_rss_bytes`: the kernel sets the high-water mark to what is resident
    now (Linux 4.0+, writing 5 to /proc/self/clear_refs). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give the memory that malloc holds free back to the kernel (glibc's malloc_trim). Freed
    blocks inside malloc's per-thread arenas otherwise stay resident; after a warm-up that has
    built and dropped hundreds of compiler objects, that is a few hundred megabytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


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
