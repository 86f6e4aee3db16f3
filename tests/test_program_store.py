"""The program store's own rules: its folder is named by what executables depend on, and it never
saves an executable JAX read from its persistent cache. (A second start loading every program, and
generating what the first did, is tested against live servers: test_server_live.)"""

from __future__ import annotations

import subprocess
import sys

from toyllm_core.serving.executables import ProgramStore


def test_the_folder_is_named_by_what_executables_depend_on(tmp_path, monkeypatch):
    a = ProgramStore(tmp_path).folder
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    b = ProgramStore(tmp_path).folder
    assert a != b and a.parent == b.parent == tmp_path


_JAX_CACHE_SCRIPT = """
import sys, jax
from pathlib import Path
jax.config.update("jax_compilation_cache_dir", sys.argv[1] + "/jax")
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from toyllm_core.config import get_preset
from toyllm_core.serving import executables
from toyllm_core.serving.cache import empty_cache
from toyllm_core.serving.executables import ProgramStore

args = (get_preset("smollm2-135m"), 16, 256, jax.numpy.bfloat16, ())
store = ProgramStore(sys.argv[1] + "/programs")
assert store.build(empty_cache, *args) == "compiled" and store.saved == 1
for f in store.folder.iterdir():
    f.unlink()
executables.forget_all()
jax.clear_caches()
assert store.build(empty_cache, *args) == "compiled"  # read from JAX's cache this time
assert store.saved == 1 and not any(store.folder.iterdir()), "an executable from JAX's cache was saved"
jax.block_until_ready(empty_cache(*args))
print("ok")
"""


def test_an_executable_read_from_jax_persistent_cache_is_not_saved(tmp_path):
    """Serialised again, such an executable loses kernels (SmolLM2's empty cache then fails to run
    with "Function wrapped_broadcast not found"): the store keeps only what it compiled itself."""
    done = subprocess.run([sys.executable, "-c", _JAX_CACHE_SCRIPT, str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
