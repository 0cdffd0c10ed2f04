"""The benchmark scripts of the embedded task: their pure functions, a smoke run of each, and the results writer.

The smoke runs share one run cache, so benchmark 3 reuses benchmark 2's GRPO run and benchmark 4 both of its runs, as
the full benchmarks do.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import arithmetic_runs as ar  # noqa: E402
import write_results  # noqa: E402


# -- pure functions ------------------------------------------------------------------------------------------------


def test_path_distribution_distance_hand_values():
    # policy over 2 paths: [0.3, 0.1] -> renormalised [0.75, 0.25]; reference [0.2, 0.2] -> [0.5, 0.5]
    policy = {"a": math.log(0.3), "b": math.log(0.1)}
    reference = {"a": math.log(0.2), "b": math.log(0.2)}
    d = ar.path_distribution_distance(policy, reference)
    assert d["tv"] == pytest.approx(0.25)
    assert d["kl"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert d["kl_reverse"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    assert d["policy_mass"] == pytest.approx(0.4)
    assert d["reference_mass"] == pytest.approx(0.4)
    assert d["policy_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert d["reference_entropy"] == pytest.approx(math.log(2))
    assert d["policy_top"] == pytest.approx(0.75) and d["reference_top"] == pytest.approx(0.5)
    assert d["policy_on_reference_top"] == pytest.approx(0.75)  # tie in the reference: the first id, "a"
    d = ar.path_distribution_distance(reference, policy)
    assert d["policy_on_reference_top"] == pytest.approx(0.5)


def test_path_distribution_distance_edge_cases():
    # the same distribution up to a constant factor (less mass on valid paths) is at distance 0
    reference = {"a": -1.0, "b": -2.0, "c": -3.0}
    d = ar.path_distribution_distance({k: v - 5.0 for k, v in reference.items()}, reference)
    assert d["tv"] == pytest.approx(0.0, abs=1e-12) and d["kl"] == pytest.approx(0.0, abs=1e-12)
    assert d["policy_mass"] == pytest.approx(d["reference_mass"] * math.exp(-5.0))
    # a single path: every distance is 0, entropies 0
    d = ar.path_distribution_distance({"a": -7.0}, {"a": -1.0})
    assert d["tv"] == 0.0 and d["kl"] == 0.0 and d["policy_entropy"] == 0.0
    # very small probabilities do not underflow the renormalisation
    d = ar.path_distribution_distance({"a": -2000.0, "b": -2000.0}, {"a": -1.0, "b": -1.0})
    assert d["tv"] == pytest.approx(0.0, abs=1e-12) and d["policy_mass"] == 0.0
    with pytest.raises(ValueError, match="same, non-empty set of paths"):
        ar.path_distribution_distance({"a": 0.0}, {"b": 0.0})
    with pytest.raises(ValueError, match="same, non-empty set of paths"):
        ar.path_distribution_distance({}, {})


def test_mean_distance():
    assert ar.mean_distance([{"tv": 0.2, "kl": 1.0}, {"tv": 0.4, "kl": 0.0}]) == pytest.approx({"tv": 0.3, "kl": 0.5})
    with pytest.raises(ValueError):
        ar.mean_distance([])


def test_rollouts_to_reach():
    rollouts, accuracy = [0, 100, 200, 300], [0.4, 0.5, 0.7, 0.6]
    assert ar.rollouts_to_reach(rollouts, accuracy, 0.6) == pytest.approx(150.0)  # halfway from 0.5 to 0.7
    assert ar.rollouts_to_reach(rollouts, accuracy, 0.7) == pytest.approx(200.0)  # exactly at a point
    assert ar.rollouts_to_reach(rollouts, accuracy, 0.3) == 0.0  # already there at the start
    assert ar.rollouts_to_reach(rollouts, accuracy, 0.8) is None  # never
    # the first crossing counts, not a later one
    assert ar.rollouts_to_reach([0, 10, 20, 30], [0.0, 1.0, 0.0, 1.0], 0.5) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        ar.rollouts_to_reach([0, 0], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="one accuracy per point"):
        ar.rollouts_to_reach([0, 1], [0.1], 0.5)


def test_mean_curve_and_summarize():
    a = [{"step": 0, "accuracy": 0.2}, {"step": 5, "accuracy": 0.4}]
    b = [{"step": 0, "accuracy": 0.4}, {"step": 5, "accuracy": 0.8}]
    assert ar.mean_curve([a, b], "accuracy") == pytest.approx([0.3, 0.6])
    with pytest.raises(ValueError, match="same steps"):
        ar.mean_curve([a, [{"step": 0, "accuracy": 0.1}, {"step": 6, "accuracy": 0.1}]], "accuracy")
    s = ar.summarize([1.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(math.sqrt(2.0)) and s["per_seed"] == [1.0, 3.0]
    assert ar.summarize([5.0])["std"] == 0.0


def test_replace_block_keeps_everything_outside_the_markers():
    text = f"# Title\n\nintro\n{write_results.START}\nold\nstuff\n{write_results.END}\n\n## After\ntext\n"
    updated = write_results.replace_block(text, "## Results\n\nnew\n")
    assert (
        updated
        == f"# Title\n\nintro\n{write_results.START}\n## Results\n\nnew\n{write_results.END}\n\n## After\ntext\n"
    )
    assert write_results.replace_block(updated, "## Results\n\nnew\n") == updated  # idempotent
    for broken in ("no markers", f"{write_results.END}\n{write_results.START}\n", f"{write_results.START}\n" * 2):
        with pytest.raises(ValueError, match="exactly one"):
            write_results.replace_block(broken, "x\n")


# -- smoke runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory):
    """Runs the three benchmark scripts in `--smoke` mode, in order, with a shared run cache."""
    root = tmp_path_factory.mktemp("bench")
    output_dir, cache_dir = root / "results", root / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    logs = {}
    for script in ("bench_distribution_matching", "bench_experience", "bench_target_distribution"):
        result = subprocess.run(
            [
                sys.executable,
                str(BENCHMARKS / f"{script}.py"),
                "--smoke",
                "--output-dir",
                str(output_dir),
                "--cache-dir",
                str(cache_dir),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        logs[script] = result.stdout
    return output_dir, logs


def _load(output_dir: Path, name: str) -> dict:
    assert (output_dir / f"{name}.png").stat().st_size > 1000
    report = json.loads((output_dir / f"{name}.json").read_text())
    assert report["benchmark"] == name and report["smoke"] is True
    assert report["machine"] and report["date"]
    return report


def test_distribution_matching_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "distribution_matching")
    assert "Target: FlowRL >= 2x GRPO's distinct correct paths" in logs["bench_distribution_matching"]
    for name in ("grpo", "flowrl"):
        (run,) = report["runs"][name]
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        # 8 problems x 8 completions per step, the recipes' batch
        assert [p["rollouts_generated"] for p in run["curve"]] == [0, 64, 128]
        assert run["rollouts_replayed"] == 0 and run["cached"] is False
        assert 0.0 <= run["curve"][-1]["accuracy"] <= 1.0
        assert run["curve"][0]["target"]["tv"] == pytest.approx(0.0, abs=1e-9)  # step 0 is the reference itself
    # both start from the same model and evaluate with the same sampling seed
    assert report["runs"]["grpo"][0]["curve"][0]["accuracy"] == report["runs"]["flowrl"][0]["curve"][0]["accuracy"]
    target = report["target"]
    assert isinstance(target["met"], bool) and target["met"] == (target["paths_met"] and target["accuracy_met"])


def test_experience_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "experience")
    assert "reusing the cached run" in logs["bench_experience"]  # GRPO's run of benchmark 2
    (grpo,) = report["runs"]["grpo"]
    (exgrpo,) = report["runs"]["exgrpo"]
    assert grpo["cached"] is True and exgrpo["cached"] is False
    assert exgrpo["rollouts_generated"] == 128
    assert exgrpo["fresh_rollouts_used"] == exgrpo["rollouts_generated"] - exgrpo["rollouts_replayed"]
    assert [p["step"] for p in report["equal_rollouts"]] == [0, 1, 2]
    assert isinstance(report["target"]["met"], bool)


def test_target_distribution_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "target_distribution")
    assert logs["bench_target_distribution"].count("reusing the cached run") == 2
    for name in ("grpo", "flowrl"):
        summary = report["summary"][name]
        assert 0.0 <= summary["tv"]["mean"] <= 1.0 and summary["kl"]["mean"] >= 0.0
        assert 0.0 < summary["policy_mass"]["mean"] <= 1.0
    assert report["anchors"]["collapsed"]["tv"] > report["anchors"]["uniform"]["tv"] > 0.0
    assert sum(report["example"]["reference"]) == pytest.approx(1.0)


def test_results_writer_renders_smoke_outputs(smoke_outputs, tmp_path):
    output_dir, _ = smoke_outputs
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nSome text.\n\n", "\n## Next section\n\nkept as it is\n"
    readme.write_text(f"{before}{write_results.START}\nstale\n{write_results.END}{after}")
    command = [sys.executable, str(BENCHMARKS / "write_results.py"), "--results-dir", str(output_dir)]
    subprocess.run([*command, "--readme", str(readme)], check=True, capture_output=True, timeout=60)
    text = readme.read_text()
    assert text.startswith(f"{before}{write_results.START}\n## Results\n") and text.endswith(
        f"{write_results.END}{after}"
    )
    assert "stale" not in text
    machine = json.loads((output_dir / "experience.json").read_text())["machine"]
    assert machine in text
    for heading in ("### 2. Distribution matching", "### 3. Experience efficiency", "### 4. Distance to FlowRL"):
        assert heading in text
    assert "Not run yet: benchmark 1 (overhead)" in text  # no overhead.json here: skipped, and said so
    assert text.count("Smoke run") == 3
    assert "](" in text and "distribution_matching.png" in text
    first = text
    subprocess.run([*command, "--readme", str(readme)], check=True, capture_output=True, timeout=60)
    assert readme.read_text() == first

    readme.write_text("# no markers\n")
    result = subprocess.run([*command, "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "results:start" in result.stderr
    assert readme.read_text() == "# no markers\n"


def test_overhead_smoke(tmp_path):
    """Benchmark 1 in `--smoke` mode: four trainers, one fresh process each, and the report the writer renders."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_overhead.py"), "--smoke", "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "target flowrl/grpo_kl <= 1.03" in result.stdout and "target exgrpo/grpo <= 1.05" in result.stdout
    report = _load(tmp_path, "overhead")
    assert set(report["summary"]) == {"grpo", "grpo_kl", "flowrl", "exgrpo"}
    for name, summary in report["summary"].items():
        assert summary["step_time_s"] > 0 and summary["peak_memory_mb"] > 0, name
        assert len(report["runs"][name]) == 1 and len(report["runs"][name][0]["step_times"]) == 2
    flowrl, grpo_kl = report["summary"]["flowrl"]["step_time_s"], report["summary"]["grpo_kl"]["step_time_s"]
    assert report["step_time_ratios"]["flowrl/grpo_kl"] == pytest.approx(flowrl / grpo_kl)
    assert report["targets"]["flowrl/grpo_kl"]["met"] == (flowrl / grpo_kl <= 1.03)
    assert report["runs"]["exgrpo"][0]["entropy_scoring_s"]  # ExGRPO replayed (and scored entropy)
    lines = write_results.render_overhead(report, tmp_path, tmp_path, "overhead")
    assert any(line.startswith("| FlowRL |") for line in lines)
    assert any("Target flowrl/grpo_kl <= 1.03" in line for line in lines)
