"""Serving programs kept whole on disk: a restart loads each executable without tracing it.

JAX's persistent compilation cache keys an entry on the lowered program, so a restart still traces
and lowers every program to find its entry: 60-70% of a warm start of the default server (a
cProfile of its warm-up). And an executable read from that cache cannot be saved again whole (it
lost kernels), so a server with a store does not use JAX's cache. Here the engine's jitted steps are `Program`s: a
warm-up builds each one for its input shapes and saves its executable in a `ProgramStore`, under a
name made of the function, its static arguments and its inputs' structure, shapes and dtypes; the
next start reads it back (jax.experimental.serialize_executable) and calls it for the same
signature, so it never traces. A call whose signature no build holds goes through `jax.jit` as
usual (and is counted as a compilation, which the engine's warm-up promise forbids).

What a name leaves out, the store's folder holds: it is named by a fingerprint of everything else
an executable depends on (this package's source, the jax and jaxlib versions, the backend and its
devices, the CPU's model and flags, XLA's flags). A changed program lands in a new folder; folders
not used for a while are removed. The files are trusted, like JAX's own cache: keep them private.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import platform
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable

from .. import jit_stats

_SOURCE_ROOT = Path(__file__).resolve().parents[1]  # toyllm_core
KEEP_UNUSED_S = 14 * 86400  # a fingerprint folder not used for two weeks is removed


try:  # private (jax 0.10); without it every call goes through jit: correct, only the start is slower
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:
    def _trace_state_clean() -> bool:
        return False


def _abstract(x) -> tuple:
    """What an input contributes to a program's signature: its shape and dtype (a Python scalar,
    whose type JAX treats as weak, by its type)."""
    if isinstance(x, (bool, int, float, complex)):
        return (type(x).__name__,)
    return (tuple(x.shape), str(x.dtype))


class Program:
    """A jitted function (as `jax.jit` takes it) that can also run executables built or loaded
    for given signatures (`add`): a call with such a signature runs its executable directly."""

    def __init__(self, fn: Callable, *, static_argnames: tuple[str, ...] = (), static_argnums: tuple[int, ...] = (),
                 donate_argnames: tuple[str, ...] = ()):
        self.jit = jax.jit(fn, static_argnames=static_argnames, static_argnums=static_argnums,
                           donate_argnames=donate_argnames)
        self.static_argnames, self.static_argnums = frozenset(static_argnames), frozenset(static_argnums)
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.executables: dict[tuple, Any] = {}
        self.compiled_here: set[tuple] = set()  # of those, compiled in this process (the ones a store may save)
        functools.update_wrapper(self, fn)
        _PROGRAMS.append(self)

    def split(self, args: tuple, kwargs: dict) -> tuple[tuple, tuple, tuple]:
        """(dynamic positional args, static values, signature key) of a call."""
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        static = tuple((i, a) for i, a in enumerate(args) if i in self.static_argnums)
        static += tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames))
        if any(k not in self.static_argnames for k in kwargs):
            raise TypeError(f"{self.name}: pass dynamic arguments by position")
        leaves, tree = jax.tree_util.tree_flatten(dynamic)
        return dynamic, static, (static, tree, tuple(_abstract(x) for x in leaves))

    def __call__(self, *args, **kwargs):
        # Inside another trace (eval_shape, or a jitted caller), the jit inlines; an executable
        # cannot take tracers.
        if self.executables and _trace_state_clean():
            dynamic, _, key = self.split(args, kwargs)
            executable = self.executables.get(key)
            if executable is not None:
                try:
                    return executable(*dynamic)
                except TypeError:  # refused before running (an input's weak type or sharding differs):
                    pass           # the jit, which handles them, takes the call
        return self.jit(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jit.lower(*args, **kwargs)

    def add(self, key: tuple, executable, compiled_here: bool = False) -> None:
        self.executables[key] = executable
        if compiled_here:
            self.compiled_here.add(key)

    def clear(self) -> None:
        self.executables.clear()
        self.compiled_here.clear()


_PROGRAMS: list[Program] = []


def forget_all() -> None:
    """Let go of every built executable (with `jax.clear_caches()`, to give their memory back)."""
    for prog in _PROGRAMS:
        prog.clear()


def program(fn: Callable | None = None, **jit_kwargs):
    """Decorator: `@program` or `@program(static_argnames=..., donate_argnames=...)`."""
    if fn is None:
        return lambda f: Program(f, **jit_kwargs)
    return Program(fn, **jit_kwargs)


def fingerprint() -> str:
    """Everything an executable depends on besides its own signature."""
    h = hashlib.sha256()
    for path in sorted(_SOURCE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(_SOURCE_ROOT)).encode())
        h.update(path.read_bytes())
    import jaxlib

    device = jax.devices()[0]
    parts = [jax.__version__, jaxlib.__version__, jax.default_backend(), device.client.platform_version,
             device.device_kind, str(len(jax.devices())), platform.machine(), _cpu_identity(),
             os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64),
             str(jax.config.jax_default_matmul_precision)]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:20]


def _cpu_identity() -> str:
    """The CPU's model and feature flags (XLA's CPU backend compiles for the host's features)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


_UNREADABLE = (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError, zlib.error,
               jax.errors.JaxRuntimeError)


class ProgramStore:
    """Builds programs for given signatures; with a directory, keeps their executables there (one
    file per signature, under a fingerprint folder) and reads them back on the next start."""

    def __init__(self, directory: str | Path | None = None):
        self.loaded = self.saved = 0
        self.root = self.folder = None
        if directory is None:
            return
        self.root = Path(directory).expanduser()
        self.folder = self.root / fingerprint()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.utime(self.folder)
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - KEEP_UNUSED_S
        for other in self.root.iterdir():
            if other != self.folder and other.is_dir() and other.stat().st_mtime < cutoff:
                shutil.rmtree(other, ignore_errors=True)

    @staticmethod
    def file_name(prog: Program, key: tuple) -> str | None:
        """The signature's file name, or None when its description is not stable across processes
        (an object printed by its address)."""
        static, tree, avals = key
        text = f"{prog.name}|{static!r}|{tree}|{avals!r}"
        if " at 0x" in text:
            return None
        return hashlib.sha256(text.encode()).hexdigest()[:32] + ".bin"

    def build(self, prog: Program, *args, **kwargs) -> str:
        """Make `prog` runnable for this call's signature without running it: loaded from the store,
        or lowered, compiled and saved. Returns "loaded", "compiled" or "known" (built already)."""
        dynamic, _, key = prog.split(args, kwargs)
        name = self.file_name(prog, key) if self.folder is not None else None
        path = self.folder / name if name else None
        if key in prog.executables:  # built already in this process (another class of one geometry)
            if path is not None and key in prog.compiled_here and not path.is_file():
                self._save(path, prog.executables[key])
            return "known"
        if path is not None and path.is_file():
            try:
                prog.add(key, _read(path.read_bytes(), jax.tree_util.tree_structure((dynamic, {}))))
                self.loaded += 1
                return "loaded"
            except _UNREADABLE:  # a damaged or foreign file: built anew below, and replaced
                path.unlink(missing_ok=True)
        lowered = prog.lower(*args, **kwargs)
        hits = jit_stats.cache_hits()
        compiled = lowered.compile()
        _forget_module(lowered)
        # An executable that JAX read from its persistent cache is not saved: serialised again, it
        # lost kernels (jax 0.10, XLA-CPU: "Function wrapped_broadcast not found" when it ran).
        fresh = jit_stats.cache_hits() == hits
        prog.add(key, compiled, compiled_here=fresh)
        if path is not None and fresh:
            self._save(path, compiled)
        return "compiled"

    def _save(self, path: Path, compiled) -> None:
        try:
            _write(path, compiled)
            self.saved += 1
        except (OSError, ValueError, NotImplementedError, pickle.PicklingError):
            pass  # not serialisable (a loaded executable, or this backend): kept in memory only

    def disk_bytes(self) -> int:
        """Bytes the store's files take, every fingerprint folder included."""
        if self.root is None:
            return 0
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


def _forget_module(lowered) -> None:
    """Let go of a built program's StableHLO module. JAX keeps the module beside the executable it
    compiled (for `.as_text()` and the like), and the cache of lowered jitted functions keeps it too:
    ~1.5 MB a program here, 0.28 GB for the default server's programs, more than the weights. The
    executable, which serving calls, stays. A private attribute (jax 0.10): where it is missing, the
    module stays and nothing else changes."""
    computation = getattr(lowered, "_lowering", None)
    if hasattr(computation, "_hlo") and getattr(computation, "_executable", None) is not None:
        computation._hlo = None


def _write(path: Path, compiled) -> None:
    payload, _, out_tree = serialize_executable.serialize(compiled)
    # The output structure, as a pytree of its leaf numbers: a pickled treedef does not round-trip
    # Equinox modules, the modules themselves do.
    out_example = out_tree.unflatten(list(range(out_tree.num_leaves)))
    with io.BytesIO() as buf:
        pickle.dump({"payload": zlib.compress(payload, 1), "out": out_example}, buf)
        data = buf.getvalue()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _read(data: bytes, in_tree) -> Any:
    saved = pickle.loads(data)  # the store is trusted, like JAX's compilation cache
    out_tree = jax.tree_util.tree_structure(saved["out"])
    return serialize_executable.deserialize_and_load(zlib.decompress(saved["payload"]), in_tree, out_tree)
