"""`toyllm bench` and `toyllm dashboard` write well-formed JSON and PNG files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab  # the lab's tools (make test-lab)

PNG = b"\x89PNG\r\n\x1a\n"


def toyllm(*args):
    result = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                            check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_bench_writes_json_and_plot_and_skips_long_contexts_for_full(tmp_path):
    toyllm("bench", "--preset", "tiny", "--lengths", "64,600", "--policies", "none,full,snapkv", "--batches", "1",
           "--repeats", "1", "--steps", "8", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert {(r["policy"], r["context"]) for r in results} == {("none", 64), ("full", 64), ("snapkv", 64), ("snapkv", 600)}
    snap = next(r for r in results if r["policy"] == "snapkv" and r["context"] == 600)
    assert snap["cache_bytes_per_sequence"] <= (64 + 16) * 2 * 2 * 2 * 8 * 4  # budget + slack tokens at most
    assert all(r["median_ms_per_step"] > 0 for r in results)
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG


def test_dashboard_writes_four_figures_and_numbers(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"The number {i} follows {i - 1} in the list." for i in range(60)))
    result = toyllm("dashboard", "--preset", "tiny", "--text-file", str(text), "--out", str(tmp_path / "d"),
                    "--policy", "snapkv", "--budget", "32", "--max-tokens", "200")
    numbers = json.loads((tmp_path / "d" / "dashboard.json").read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == numbers
    assert numbers["tokens"] == 200 and numbers["compression_ratio"] > 3
    for name in ("stability", "retention", "kept_positions", "performance"):
        assert (tmp_path / "d" / f"{name}.png").read_bytes()[:8] == PNG


def test_bench_times_fewer_steps_under_the_full_cache_at_contexts_up_to_steps(tmp_path):
    # The README's long example starts at context 64 with the default 64 timed steps.
    toyllm("bench", "--preset", "tiny", "--lengths", "8,64,100", "--policies", "full", "--batches", "1",
           "--repeats", "1", "--json", str(tmp_path / "b.json"))
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    bpt = 2 * 2 * 2 * 8 * 2  # K and V, 2 layers, 2 KV heads, head_dim 8, bfloat16
    assert [(r["context"], r["steps"]) for r in results] == [(8, 4), (64, 32), (100, 64)]
    assert [r["cache_bytes_per_sequence"] for r in results] == [8 * bpt, 64 * bpt, 100 * bpt]


def test_bench_refuses_bad_lengths_before_any_work():
    for lengths, message in [("1,64", "context 1 is too short"), ("64,x", "--lengths must be")]:
        result = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--preset", "tiny", "--lengths", lengths,
                                 "--policies", "none,full"], capture_output=True, text=True, check=False, timeout=300)
        assert result.returncode == 2 and result.stdout == ""  # nothing was timed
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr
