"""Built programs kept whole on disk: a second warm-up loads every one without tracing or compiling
it (a damaged file is built again), and the loaded programs generate exactly what freshly compiled
ones do."""

from __future__ import annotations

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
    for cls, n in zip(classes, (20, 90), strict=True):  # the second prompt passes the snapkv budget
        seq = engine.run_prefill(np.random.default_rng(n).integers(0, 50257, n), cls, params)
        tokens = [seq.pending]
        while seq.active:
            tokens += [t for o in engine.step() for t in o.tokens]
        out.append(tokens)
    return out


def test_a_second_warm_up_loads_every_program_and_generates_the_same(model, tmp_path):
    classes = [CacheClass.make(make_policy("full"), 2, 64, tokens=128),
               CacheClass.make(make_policy("snapkv", budget=48), 2, 64)]
    executables.forget_all()  # what earlier tests built would be "known", not saved

    first = warm_up(model, classes, 4, log=lambda msg: None, batch_rows=4, store=ProgramStore(tmp_path))
    assert first["loaded"] == 0 and first["saved"] > len(programs(classes, 4)) // 2
    before = jit_stats.compilations()
    built = _generate(model, classes)
    assert jit_stats.compilations() == before  # the warm-up built what serving calls

    damaged = min(tmp_path.rglob("*.bin"))
    damaged.write_bytes(b"not a program")
    executables.forget_all()
    jax.clear_caches()
    store = ProgramStore(tmp_path)
    second = warm_up(model, classes, 4, log=lambda msg: None, batch_rows=4, store=store)
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
