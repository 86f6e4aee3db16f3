"""Built programs kept whole on disk: a second warm-up loads every one without tracing or compiling
it (a damaged file is built again), and the loaded programs generate exactly what freshly compiled
ones do."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np

from toyllm_core import jit_stats
from toyllm_core.serving import executables
from toyllm_core.serving.engine import CacheClass, Engine, programs, warm_up
from toyllm_core.serving.executables import ProgramStore
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams


def _generate(model, classes) -> list[list[int]]:
    engine = Engine(model, classes, steps_per_call=4)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=3, ignore_eos=True)
    out = []
    for n in (20, 90):  # the second prompt passes the snapkv budget
        seq = engine.run_prefill(np.random.default_rng(n).integers(0, 50257, n), classes[0], params)
        tokens = [seq.pending]
        while seq.active:
            tokens += [t for o in engine.step() for t in o.tokens]
        out.append(tokens)
    return out


def test_a_second_warm_up_loads_every_program_and_generates_the_same(model, tmp_path):
    classes = [CacheClass.make(make_policy("snapkv", budget=48), 2, 64)]
    executables.forget_all()  # what earlier tests built would be "known", not saved

    first = warm_up(model, classes, 4, log=lambda msg: None, batch_rows=2, store=ProgramStore(tmp_path))
    assert first["loaded"] == 0 and first["saved"] > len(programs(classes, 2)) // 2
    before = jit_stats.compilations()
    built = _generate(model, classes)
    assert jit_stats.compilations() == before  # the warm-up built what serving calls

    damaged = min(tmp_path.rglob("*.bin"))
    damaged.write_bytes(b"not a program")
    executables.forget_all()
    jax.clear_caches()
    store = ProgramStore(tmp_path)
    second = warm_up(model, classes, 4, log=lambda msg: None, batch_rows=2, store=store)
    # Every file loaded whole but the damaged one, which was built again and replaced.
    assert second["loaded"] == first["saved"] - 1 and second["saved"] == 1 and second["compilations"] == 1
    assert damaged.read_bytes() != b"not a program"
    assert _generate(model, classes) == built
    assert jit_stats.compilations() - before == second["compilations"]  # nothing compiled while serving
    assert store.disk_bytes() > 0


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
