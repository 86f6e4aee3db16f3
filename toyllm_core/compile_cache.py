"""JAX's persistent compilation cache: the programs a start compiles, kept on disk for the next.

JAX keys each entry on the program itself (its HLO, so the model's shapes and dtype and every
shape the cache classes imply), the compile options, the backend and device, and the jax and jaxlib
versions: a changed model, setting or machine compiles anew, and a restart with the same ones reads
what the last start compiled. Weights are arguments of every program, never constants, so they are
not part of the key. The directory is trusted (JAX runs what it reads from it): keep it private.
"""

from __future__ import annotations

from pathlib import Path

import jax


def enable(directory: str | Path) -> Path | None:
    """Read and write compiled programs under `directory` (created if missing), every program
    whatever its size or compile time. Call before the first compilation of the process. Returns
    the directory, or None (and compiles as usual) when it cannot be created."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


def disk_bytes(directory: str | Path) -> int:
    """Bytes the cache's files take."""
    path = Path(directory).expanduser()
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
