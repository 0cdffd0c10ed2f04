"""The benchmark scripts of the embedded task: their pure functions, the arms, a smoke run of each, and the results
writer.

The smoke runs share one run cache, so benchmark 4 reuses the runs of all of
benchmark 2's arms, as the full benchmarks do; between them they train every arm of `arms.ARMS` once.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_distribution_matching as bdm  # noqa: E402
import bench_experience as bex  # noqa: E402
import write_results  # noqa: E402
from arms import ARMS, LABELS, TRAINER_NAMES  # noqa: E402
from heldout import EvalSpec, validation_benchmark  # noqa: E402
from learning_rates import learning_rate_protocol  # noqa: E402
from metrics import (  # noqa: E402
    mean_curve,
    mean_distance,
    path_distribution_distance,
    question_counts,
    rollouts_to_reach,
    summarize,
)
from reporting import command_line  # noqa: E402
from run_options import parse_arms  # noqa: E402
from runs import (  # noqa: E402
    _check_expected,
    _model_identity,
    _resolved_settings,
    _run_key,
    _trainer_classes,
    recipe_path,
    tracked_run,
)


# -- pure functions ------------------------------------------------------------------------------------------------


def test_path_distribution_distance_hand_values():
    # policy over 2 paths: [0.3, 0.1] -> renormalised [0.75, 0.25]; reference [0.2, 0.2] -> [0.5, 0.5]
    policy = {"a": math.log(0.3), "b": math.log(0.1)}
    reference = {"a": math.log(0.2), "b": math.log(0.2)}
    d = path_distribution_distance(policy, reference)
    assert d["tv"] == pytest.approx(0.25)
    assert d["kl"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert d["kl_reverse"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    assert d["policy_mass"] == pytest.approx(0.4)
    assert d["reference_mass"] == pytest.approx(0.4)
    assert d["policy_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert d["reference_entropy"] == pytest.approx(math.log(2))
    assert d["policy_top"] == pytest.approx(0.75) and d["reference_top"] == pytest.approx(0.5)
    assert d["policy_on_reference_top"] == pytest.approx(0.75)  # tie in the reference: the first id, "a"
    d = path_distribution_distance(reference, policy)
    assert d["policy_on_reference_top"] == pytest.approx(0.5)


def test_path_distribution_distance_edge_cases():
    # the same distribution up to a constant factor (less mass on valid paths) is at distance 0
    reference = {"a": -1.0, "b": -2.0, "c": -3.0}
    d = path_distribution_distance({k: v - 5.0 for k, v in reference.items()}, reference)
    assert d["tv"] == pytest.approx(0.0, abs=1e-12) and d["kl"] == pytest.approx(0.0, abs=1e-12)
    assert d["policy_mass"] == pytest.approx(d["reference_mass"] * math.exp(-5.0))
    # a single path: every distance is 0, entropies 0
    d = path_distribution_distance({"a": -7.0}, {"a": -1.0})
    assert d["tv"] == 0.0 and d["kl"] == 0.0 and d["policy_entropy"] == 0.0
    # very small probabilities do not underflow the renormalisation
    d = path_distribution_distance({"a": -2000.0, "b": -2000.0}, {"a": -1.0, "b": -1.0})
    assert d["tv"] == pytest.approx(0.0, abs=1e-12) and d["policy_mass"] == 0.0
    with pytest.raises(ValueError, match="same, non-empty set of paths"):
        path_distribution_distance({"a": 0.0}, {"b": 0.0})
    with pytest.raises(ValueError, match="same, non-empty set of paths"):
        path_distribution_distance({}, {})


def test_mean_distance():
    assert mean_distance([{"tv": 0.2, "kl": 1.0}, {"tv": 0.4, "kl": 0.0}]) == pytest.approx({"tv": 0.3, "kl": 0.5})
    with pytest.raises(ValueError):
        mean_distance([])


def test_rollouts_to_reach():
    rollouts, accuracy = [0, 100, 200, 300], [0.4, 0.5, 0.7, 0.6]
    assert rollouts_to_reach(rollouts, accuracy, 0.6) == pytest.approx(150.0)  # halfway from 0.5 to 0.7
    assert rollouts_to_reach(rollouts, accuracy, 0.7) == pytest.approx(200.0)  # exactly at a point
    assert rollouts_to_reach(rollouts, accuracy, 0.3) == 0.0  # already there at the start
    assert rollouts_to_reach(rollouts, accuracy, 0.8) is None  # never
    # the first crossing counts, not a later one
    assert rollouts_to_reach([0, 10, 20, 30], [0.0, 1.0, 0.0, 1.0], 0.5) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        rollouts_to_reach([0, 0], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="one accuracy per point"):
        rollouts_to_reach([0, 1], [0.1], 0.5)


def test_mean_curve_and_summarize():
    a = [{"step": 0, "accuracy": 0.2}, {"step": 5, "accuracy": 0.4}]
    b = [{"step": 0, "accuracy": 0.4}, {"step": 5, "accuracy": 0.8}]
    assert mean_curve([a, b], "accuracy") == pytest.approx([0.3, 0.6])
    with pytest.raises(ValueError, match="same steps"):
        mean_curve([a, [{"step": 0, "accuracy": 0.1}, {"step": 6, "accuracy": 0.1}]], "accuracy")
    s = summarize([1.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(math.sqrt(2.0)) and s["per_seed"] == [1.0, 3.0]
    assert summarize([5.0])["std"] == 0.0


def test_parse_arms():
    assert parse_arms(None, ("grpo", "flowrl")) == ["grpo", "flowrl"]
    assert parse_arms(" ", ("grpo",)) == ["grpo"]
    assert parse_arms("flowrl_matching, grpo", ("grpo",)) == ["flowrl_matching", "grpo"]  # the order given
    for bad in ("grpo,nope", "grpo,grpo"):
        with pytest.raises(ValueError, match="distinct arms"):
            parse_arms(bad, ("grpo",))


def test_question_counts():
    assert question_counts({"a", "b"}) == {
        "distinct_questions": 2,
        "distinct_questions_sampled": 2,
        "source": "sampler",
    }
    # a trainer that says what it trained on decides (ExGRPO: the sampler's stream is not what it trains on)
    counts = question_counts({"a", "b", "c"}, fresh={"a", "b"}, replays={"a": 2, "z": 1})
    assert counts["distinct_questions"] == 3 and counts["distinct_questions_sampled"] == 3
    assert counts["distinct_fresh_questions"] == 2 and counts["distinct_replayed_questions"] == 2
    assert counts["replays"] == 3 and counts["max_replays_per_question"] == 2 and counts["source"] == "trainer"


def test_arms_registry():
    assert {"grpo", "grpo_kl", "flowrl", "flowrl_matching", "flowrl_matching_b5"} <= set(ARMS)
    assert {"exgrpo", "exgrpo_no_replay"} <= set(ARMS)
    assert all(arm.trainer in TRAINER_NAMES for arm in ARMS.values())
    assert len({arm.color for arm in ARMS.values()}) == len(ARMS)
    assert ARMS["grpo_kl"].overrides == ("--beta", "0.0667")  # 1/15, the official objective's pull
    assert ARMS["flowrl"].overrides == ("--objective", "official", "--beta", "15")
    assert ARMS["flowrl_matching"].overrides == ("--objective", "matching", "--beta", "15")
    assert ARMS["flowrl_matching_b5"].overrides == ("--objective", "matching", "--beta", "5")
    assert ARMS["exgrpo_no_replay"].overrides == ("--replay_ratio", "0.0")


@pytest.mark.parametrize("name", sorted(ARMS))
def test_arm_resolves_to_what_it_stands_for(name, tmp_path):
    """Each arm, parsed with its trainer's embedded recipe, gives the settings it names (whatever that recipe's own
    objective), and a setting that differs is refused unless overridden on purpose."""
    from trl_flowrl.recipe import parse_recipe_args

    arm = ARMS[name]
    _, config_cls = _trainer_classes(arm.trainer)
    argv = [*arm.overrides, "--output_dir", str(tmp_path)]
    _, training_args, _ = parse_recipe_args(config_cls, recipe_path(arm.trainer), argv=argv)
    _check_expected(name, training_args, [])
    for key, value in arm.expect.items():
        assert getattr(training_args, key) == value
    if arm.expect:
        key = next(iter(arm.expect))
        changed = types.SimpleNamespace(**{**vars(training_args), key: "something else"})
        with pytest.raises(ValueError, match=f"stands for {key}="):
            _check_expected(name, changed, [])
        _check_expected(name, changed, [f"--{key}", "x"])  # the caller overrode it: allowed


def test_run_key_and_model_identity(tmp_path):
    spec = EvalSpec()
    embedded = _model_identity(None)
    assert embedded["embedded"] and _model_identity(embedded["path"]) == embedded
    copy = shutil.copytree(embedded["path"], tmp_path / "copy")  # the same files elsewhere: the same runs
    assert _model_identity(copy)["digest"] == embedded["digest"] and not _model_identity(copy)["embedded"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\x00" * 10)
    other = _model_identity(model)
    assert not other["embedded"] and len(other["digest"]) == 64
    from trl import GRPOConfig

    from trl_flowrl.recipe import parse_recipe_args

    def settings(*argv):
        script_args, training_args, _ = parse_recipe_args(
            GRPOConfig, recipe_path("grpo"), argv=[*argv, "--output_dir", str(tmp_path / "x")]
        )
        return _resolved_settings(script_args, training_args)

    base = settings()
    assert settings("--output_dir", str(tmp_path / "elsewhere")) == base  # where a run writes is not what it trains
    keys = {
        _run_key("grpo", base, spec, embedded),
        _run_key("grpo", settings("--beta", "0.0667"), spec, embedded),
        _run_key("grpo", settings("--num_train_problems", "800"), spec, embedded),
        _run_key("grpo", base, spec, other),
        _run_key("grpo", base, EvalSpec(num_problems=8), embedded),
    }
    assert len(keys) == 5
    assert _run_key("grpo", base, spec, other) == _run_key("grpo", base, spec, _model_identity(model))
    (model / "weights.bin").write_bytes(b"\x01" * 10)  # other weights: another run
    assert _model_identity(model)["digest"] != other["digest"]
    with pytest.raises(ValueError, match="local model directory"):
        _model_identity(tmp_path / "missing")


def test_tracked_run_refuses_bad_arguments(tmp_path):
    spec = EvalSpec()
    with pytest.raises(ValueError, match="Unknown arm"):
        tracked_run("nope", 0, 1, spec, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="model_path"):
        tracked_run("grpo", 0, 1, spec, cache_dir=tmp_path, extra_overrides=["--model_name_or_path", "x"])
    assert not any(tmp_path.iterdir())


def _final(paths, accuracy, tv):
    """A hand-made `final_summary` entry from per-seed values."""
    return {
        "distinct_correct_paths": summarize(paths),
        "accuracy": summarize(accuracy),
        "tv": summarize(tv),
    }


def test_evaluate_targets_met_and_missed():
    grpo = _final([2.0, 2.0], [0.80, 0.84], [0.80, 0.82])
    met = bdm.evaluate_targets({"grpo": grpo, "m": _final([6.0, 7.0], [0.81, 0.82], [0.2, 0.3])}, "m", bdm.ISSUE9)
    checks = met["checks"]
    assert met["met"] and met["arm"] == "m" and met["baseline"] == "grpo" and met["role"] == "target"
    assert checks["paths_ratio"]["value"] == pytest.approx(3.25) and checks["paths_ratio"]["margin"] == pytest.approx(
        0.25
    )
    assert checks["paths_ratio"]["per_seed"] == pytest.approx([3.0, 3.5])
    assert checks["accuracy_gap"]["value"] == pytest.approx(-0.5)  # points: 81.5 - 82.0
    assert checks["accuracy_gap"]["margin"] == pytest.approx(1.5) and checks["accuracy_gap"]["threshold"] == -2.0
    assert checks["tv"]["value"] == pytest.approx(0.25) and checks["tv"]["margin"] == pytest.approx(0.05)

    # missed on every count, each by a known margin: paths 2.5x (short 0.5x), -3 points (1 over), TV 0.35 (0.05 over)
    missed = bdm.evaluate_targets(
        {"grpo": grpo, "m": _final([5.0, 5.0], [0.77, 0.81], [0.35, 0.35])}, "m", bdm.ISSUE9, role="information"
    )
    checks = missed["checks"]
    assert not missed["met"] and missed["role"] == "information"
    assert not checks["paths_ratio"]["met"] and checks["paths_ratio"]["margin"] == pytest.approx(-0.5)
    assert not checks["accuracy_gap"]["met"] and checks["accuracy_gap"]["margin"] == pytest.approx(-1.0)
    assert not checks["tv"]["met"] and checks["tv"]["margin"] == pytest.approx(-0.05)
    assert bdm.describe_check("paths_ratio", checks["paths_ratio"], "GRPO") == (
        "distinct correct paths / GRPO's: 2.50x (per seed 2.50x, 2.50x); target >= 3.00x: MISSED by 0.50x"
    )
    assert bdm.describe_check("accuracy_gap", checks["accuracy_gap"]).endswith("MISSED by 1.0 points")
    # exactly at a threshold is met, with margin 0
    edge = bdm.evaluate_targets({"grpo": grpo, "m": _final([6.0, 6.0], [0.8, 0.8], [0.1, 0.1])}, "m", bdm.ISSUE9)
    assert edge["checks"]["paths_ratio"]["met"] and edge["checks"]["paths_ratio"]["margin"] == 0.0
    assert bdm.describe_check("tv", edge["checks"]["tv"]).endswith("met (margin 0.200)")

    # one target missed is enough to miss; issue 6's targets have no TV check
    only_tv = bdm.evaluate_targets({"grpo": grpo, "m": _final([9.0, 9.0], [0.9, 0.9], [0.31, 0.31])}, "m", bdm.ISSUE9)
    assert [c["met"] for c in only_tv["checks"].values()] == [True, True, False] and not only_tv["met"]
    assert set(bdm.evaluate_targets({"grpo": grpo, "m": grpo}, "m", bdm.ISSUE6)["checks"]) == {
        "paths_ratio",
        "accuracy_gap",
    }

    # a baseline without a correct path: the ratio is undefined, met only if the arm has some
    none = _final([0.0, 0.0], [0.0, 0.0], [0.9, 0.9])
    undefined = bdm.evaluate_targets({"grpo": none, "m": _final([1.0, 0.0], [0.1, 0.0], [0.1, 0.1])}, "m", bdm.ISSUE9)
    paths = undefined["checks"]["paths_ratio"]
    assert paths["value"] is None and paths["margin"] is None and paths["met"] and paths["per_seed"] == [None, None]
    assert not bdm.evaluate_targets({"grpo": none, "m": none}, "m", bdm.ISSUE9)["checks"]["paths_ratio"]["met"]


def _experience_run(seed: int, accuracies: list[float], replayed: int = 0) -> dict:
    curve = [
        {
            "step": 10 * i,
            "rollouts_generated": 100.0 * i,
            "fresh_rollouts_used": 100.0 * i - replayed * i,
            "accuracy": a,
        }
        for i, a in enumerate(accuracies)
    ]
    return {
        "seed": seed,
        "curve": curve,
        "rollouts_generated": curve[-1]["rollouts_generated"],
        "rollouts_replayed": replayed * (len(accuracies) - 1),
        "questions": {"distinct_questions": 10},
    }


def test_experience_ablations_are_compared_on_their_own_seeds():
    grpo = [_experience_run(0, [0.2, 0.4, 0.5]), _experience_run(1, [0.2, 0.3, 0.9])]
    exgrpo = [_experience_run(0, [0.2, 0.5, 0.6], 10), _experience_run(1, [0.2, 0.6, 0.7], 10)]
    ablation = [_experience_run(1, [0.2, 0.2, 0.65], 10)]  # seed 1 only
    s = bex.arm_summary(grpo, ablation, exgrpo)
    assert s["seeds"] == [1]
    # against GRPO's seed 1 (0.9), not the mean over both seeds (0.7)
    assert s["gap_points"]["mean"] == pytest.approx(-25.0)
    assert s["to_reach_grpo_final"]["grpo_final_accuracy"] == pytest.approx(0.9)
    assert s["to_reach_grpo_final"]["ratio"] is None  # 0.65 never reaches 0.9
    assert s["gap_to_exgrpo_points"]["mean"] == pytest.approx(-5.0)  # 0.65 - ExGRPO's seed-1 0.70
    # a main arm: every seed, each against GRPO's own (60 - 50 and 70 - 90 points), no ExGRPO gap
    main = bex.arm_summary(grpo, exgrpo)
    assert main["seeds"] == [0, 1] and "gap_to_exgrpo_points" not in main
    assert main["gap_points"]["per_seed"] == pytest.approx([10.0, -20.0])
    with pytest.raises(ValueError, match="seed"):
        bex.arm_summary(grpo, [_experience_run(2, [0.1, 0.2, 0.3])])


def test_results_writer_target_lines():
    grpo = _final([2.0, 2.0], [0.80, 0.84], [0.80, 0.82])
    missed = bdm.evaluate_targets({"grpo": grpo, "m": _final([5.0, 5.0], [0.77, 0.81], [0.35, 0.35])}, "m", bdm.ISSUE9)
    report = {"settings": {"arms": {"m": {"label": "FlowRL matching (beta 5)"}, "grpo": {"label": "GRPO"}}}}
    lines = write_results._evaluation_lines(missed, report)
    assert lines[1] == "Targets (issue 9), FlowRL matching (beta 5) against GRPO: **missed**."
    assert lines[2] == (
        "- Distinct correct paths, ratio to GRPO's: 2.50x (per seed 2.50x, 2.50x); target at least 3.00x: "
        "**missed**, short by 0.50x."
    )
    assert lines[3].endswith("target at least -2.0 points: **missed**, short by 1.0 points.")
    assert lines[4].endswith("target at most 0.300: **missed**, short by 0.050.")
    met = bdm.evaluate_targets({"grpo": grpo, "m": _final([6.0, 7.0], [0.81, 0.82], [0.2, 0.3])}, "m", bdm.ISSUE9)
    assert write_results._evaluation_lines(met, report)[4].endswith("**met** (margin 0.050).")


def test_results_writer_names_the_command_a_report_was_made_with():
    settings = {"steps": 600, "eval": {"every": 50}, "seeds": [0, 1, 2]}
    recorded = {"command": "python benchmarks/bench_distribution_matching.py --steps 600", "settings": settings}
    assert write_results._command(recorded, "distribution_matching") == recorded["command"]
    # a report from before commands were recorded: the flags its settings show to differ from the shared defaults
    old = {"settings": {**settings, "learning_rates": {"choices": [1e-4]}}, "torch_threads": 2}
    assert write_results._command(old, "distribution_matching") == (
        "python benchmarks/bench_distribution_matching.py --steps 600 --eval-every 50 --num-threads 2 "
        "--learning-rates 0.0001"
    )
    defaults = {"steps": 300, "eval": {"every": 25}, "learning_rates": {"choices": [3e-5, 1e-4, 3e-4]}}
    assert write_results._command({"settings": defaults, "torch_threads": 1}, "replay") == (
        "python benchmarks/bench_replay.py"
    )
    ablations = {"arms": {"exgrpo_no_is": {"seeds": [0], "gap_to_exgrpo_points": 1.0}}}
    experience = {"settings": {**settings, "ablation_seeds": [0]}, "regimes": {"scarce": ablations}}
    assert write_results._command(experience, "experience").endswith("--eval-every 50 --ablation-seeds 0")
    experience["regimes"] = {"scarce": {"arms": {"exgrpo": {"seeds": [0, 1, 2]}}}}  # no ablation ran: no flag
    assert write_results._command(experience, "experience").endswith("--eval-every 50")
    # benchmarks with options of their own (here 20 steps is benchmark 1's default) are not second-guessed
    assert write_results._command({"settings": {"steps": 20}}, "overhead") == "python benchmarks/bench_overhead.py"


def test_recorded_command_leaves_out_local_directories():
    argv = ["--steps", "600", "--output-dir", "/tmp/a", "--cache-dir=/tmp/b", "--arms", "grpo"]
    assert command_line("/x/benchmarks/bench_replay.py", argv) == (
        "python benchmarks/bench_replay.py --steps 600 --arms grpo"
    )


def test_results_writer_longer_runs_say_which_rates_the_protocol_chose(tmp_path):
    def run(accuracies):  # a curve evaluated at steps 0, 300 and 600
        points = [(0, 0.4), (300, accuracies[0]), (600, accuracies[1])]
        curve = [{"step": s, "accuracy": a, "distinct_correct_paths": 3.0, "target": {"tv": 0.5}} for s, a in points]
        return {"curve": curve}

    labels = {"grpo": "GRPO", "flowrl": "FlowRL official", "flowrl_matching_b5": "FlowRL matching (beta 5)"}
    arms = {name: {"label": label} for name, label in labels.items()}
    report = {"settings": {"steps": 300, "arms": arms, "learning_rates": {"chosen": {"grpo": 1e-4, "flowrl": 1e-4}}}}
    final = {name: _final([3.0, 3.0], [0.8, 0.9], [0.5, 0.5]) for name in ("grpo", "flowrl_matching_b5")}
    longer = {
        "command": "python benchmarks/bench_distribution_matching.py --steps 600",
        "date": "2026-12-07",
        "machine": "m",
        "settings": {
            "steps": 600,
            "seeds": [0, 1],
            "arms": arms,
            "learning_rates": {"chosen": {"grpo": 1e-4, "flowrl": 3e-4, "flowrl_matching_b5": 1e-4}},
        },
        "runs": {
            "grpo": [run((0.7, 0.8)), run((0.8, 0.9))],
            "flowrl": [run((0.7, 0.8)), run((0.7, 0.8))],
            "flowrl_matching_b5": [run((0.5, 0.6)), run((0.6, 0.6))],
        },
        "evaluations": [bdm.evaluate_targets(final, "flowrl_matching_b5", bdm.ISSUE9, role="information")],
    }
    (tmp_path / "x_tradeoff.png").write_bytes(b"png")
    text = "\n".join(write_results._longer_run_lines(longer, report, tmp_path, tmp_path, "x"))
    assert "m (cpu), with `python benchmarks/bench_distribution_matching.py --steps 600` (seeds 0, 1)." in text
    assert "GRPO: at the learning rate the protocol chose above, run for 600 steps;" in text
    assert "FlowRL official: at 0.0003, not the 0.0001 the protocol chose at 300 steps;" in text
    assert "FlowRL matching (beta 5), not an arm of the protocol above, at 0.0001 without a choice of its own" in text
    assert (
        "| held-out accuracy (%) | 75.0 -> 85.0 (80.0, 90.0) | 70.0 -> 80.0 (80.0, 80.0) | 55.0 -> 60.0 (60.0, "
        in text
    )
    assert "Against the targets of issue 9, FlowRL matching (beta 5) against GRPO (information, not a target)" in text
    assert "![accuracy against distinct paths at 600 steps](x_tradeoff.png)" in text
    assert _table_rows_off_header(text) == []


def test_mean_point_of_a_step():
    def run(points):
        return {"curve": [{"step": s, "accuracy": a, "distinct_correct_paths": n} for s, a, n in points]}

    records = [run([(0, 0.4, 4.0), (300, 0.6, 3.0)]), run([(0, 0.4, 4.0), (300, 0.8, 2.0)])]
    assert bdm.mean_point(records) == pytest.approx((2.5, 70.0))
    assert bdm.mean_point(records, 0) == pytest.approx((4.0, 40.0))
    assert bdm.mean_point(records, 150) is None  # not evaluated there: no point rather than a wrong one


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


# -- the learning-rate protocol -------------------------------------------------------------------------------------


def _fake_run(validation):
    """A `run` for learning_rate_protocol that records its calls; `validation[(arm, lr)]` is the final accuracy."""
    calls = []

    def run(name, seed, overrides):
        lr = float(overrides[1])
        calls.append((name, seed, lr))
        return {"seed": seed, "lr": lr, "curve": [{"validation": {"accuracy": validation.get((name, lr), 0.0)}}]}

    return run, calls


def test_learning_rate_protocol_chooses_on_validation_and_reuses_the_chosen_run():
    run, calls = _fake_run({("a", 1e-4): 0.5, ("a", 3e-4): 0.7, ("b", 1e-4): 0.6, ("b", 3e-4): 0.6})
    sweep, chosen, runs = learning_rate_protocol(["a", "b"], [0, 1, 2], [1e-4, 3e-4], run)
    assert chosen == {"a": 3e-4, "b": 1e-4}  # a tie goes to the smaller rate
    assert runs["a"][0] is sweep["a"][3e-4] and [r["seed"] for r in runs["a"]] == [0, 1, 2]
    assert {r["lr"] for r in runs["b"]} == {1e-4}
    # the same budget for every arm (one run per rate, first seed), then the other seeds interleaved
    assert calls == [
        ("a", 0, 1e-4), ("a", 0, 3e-4), ("b", 0, 1e-4), ("b", 0, 3e-4),
        ("a", 1, 3e-4), ("b", 1, 1e-4), ("a", 2, 3e-4), ("b", 2, 1e-4),
    ]  # fmt: skip


def test_validation_split_is_neither_training_nor_held_out():
    from trl_flowrl.tasks import arithmetic_dataset, is_held_out

    training = arithmetic_dataset(2000, seed=0, split="train")["terms"]
    benchmark = validation_benchmark(64, training)
    terms = [tuple(sorted(row["terms"])) for row in benchmark.rows]
    assert len(set(terms)) == 64
    assert not set(terms) & {tuple(sorted(t)) for t in training}
    assert not any(is_held_out(t) for t in terms)
    assert validation_benchmark(64, training).rows == benchmark.rows  # the same problems for every run
    assert benchmark.grader is not None and benchmark.path_id is not None
    with pytest.raises(ValueError, match="validation_problems"):
        EvalSpec(validation_problems=-1)


def _table_rows_off_header(markdown: str) -> list[str]:
    """The rows of the markdown tables in `markdown` whose number of cells is not their header's (GitHub drops the
    cells past the header's columns, and pads a short row)."""

    def cells(line: str) -> int:
        return len(line.strip().removeprefix("|").removesuffix("|").split("|"))

    wrong, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = cells(line)
        elif cells(line) != header:
            wrong.append(f"{cells(line)} cells under a header of {header}: {line}")
    return wrong


def test_results_writer_tables_have_a_header_for_every_cell():
    assert _table_rows_off_header("| a | b |\n|---|---:|\n| x | 1 |\n\n| c |\n|---|\n| y |") == []
    assert len(_table_rows_off_header("| a | b |\n|---|---:|\n| x | 1 | 2 | 3 |\n| z |")) == 2
    results = REPO / "benchmarks" / "results"
    if not any(results.glob("*.json")):
        pytest.skip("no benchmark results in benchmarks/results")
    text = write_results.render(results, REPO)
    assert "| arm | final accuracy" in text or not (results / "experience.json").is_file()
    assert _table_rows_off_header(text) == []


# -- smoke runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory):
    """Runs the benchmark scripts of the embedded tasks in `--smoke` mode, in order, with a shared run cache."""
    root = tmp_path_factory.mktemp("bench")
    output_dir, cache_dir = root / "results", root / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    logs = {}
    scripts = {
        "bench_distribution_matching": (),
        "bench_experience": (),
        "bench_target_distribution": (),
        "bench_replay": (),
        "bench_pass_at_k": ("--arms", "grpo,flowrl_matching"),  # the official arm adds only time
    }
    for script, extra in scripts.items():
        result = subprocess.run(
            [
                sys.executable,
                str(BENCHMARKS / f"{script}.py"),
                "--smoke",
                "--output-dir",
                str(output_dir),
                "--cache-dir",
                str(cache_dir),
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
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
    log = logs["bench_distribution_matching"]
    assert "issue 18 (target): FlowRL matching (beta 15) against GRPO:" in log
    assert list(report["runs"]) == list(bdm.ARMS) == list(report["settings"]["arms"])
    assert report["command"] == "python benchmarks/bench_distribution_matching.py --smoke"  # no local directories
    # the learning-rate protocol: two rates in smoke mode, chosen on the validation split, the chosen run reused
    assert report["settings"]["learning_rates"]["choices"] == [1e-4, 3e-4]
    for name, choice in report["learning_rate_choice"].items():
        assert set(choice["validation"]) == {"0.0001", "0.0003"}
        best = max(v["accuracy"] for v in choice["validation"].values())
        assert choice["validation"][f"{choice['chosen']:g}"]["accuracy"] == best
        (run,) = report["runs"][name]
        assert run["config"]["learning_rate"] == choice["chosen"]
        assert run["curve"][-1]["validation"]["accuracy"] == best and "validation" not in run["curve"][1]
    assert (output_dir / "distribution_matching_tradeoff.png").stat().st_size > 1000
    for name in bdm.ARMS:
        (run,) = report["runs"][name]
        assert run["arm"] == name and run["cached"] is False
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        # 8 problems x 8 completions per step, the recipes' batch
        assert [p["rollouts_generated"] for p in run["curve"]] == [0, 64, 128]
        assert [p["distinct_questions"] for p in run["curve"]] == [0, 8, 16]
        assert run["questions"]["source"] == "sampler" and run["rollouts_replayed"] == 0
        assert 0.0 <= run["curve"][-1]["accuracy"] <= 1.0
        assert run["curve"][0]["target"]["tv"] == pytest.approx(0.0, abs=1e-9)  # step 0 is the reference itself
        for key, value in ARMS[name].expect.items():  # the settings the arm stands for, as trained
            assert run["config"][key] == value, (name, key)
        # every arm starts from the same model and evaluates with the same sampling seed
        assert run["curve"][0]["accuracy"] == report["initial"]["accuracy"]
        assert set(report["final"][name]) >= {"accuracy", "distinct_correct_paths", "tv", "kl", "kl_reverse"}
    assert report["runs"]["grpo_kl"][0]["config"]["loss_type"] == report["runs"]["grpo"][0]["config"]["loss_type"]
    evaluations = {(e["arm"], e["role"]) for e in report["evaluations"]}
    assert evaluations == {("flowrl_matching", "target"), ("flowrl_matching", "superseded"), ("flowrl", "superseded")}
    for evaluation in report["evaluations"]:
        assert evaluation["met"] == all(c["met"] for c in evaluation["checks"].values())


def test_experience_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "experience")
    assert set(report["regimes"]) == {"scarce", "plentiful"}
    scarce, plentiful = report["runs"]["scarce"], report["runs"]["plentiful"]
    assert list(scarce) == ["grpo", "exgrpo", "exgrpo_no_replay", "exgrpo_no_shaping"]  # one ablation in smoke mode
    assert list(plentiful) == ["grpo", "exgrpo_requeue"]
    (grpo,) = plentiful["grpo"]
    (exgrpo,) = scarce["exgrpo"]
    (no_replay,) = scarce["exgrpo_no_replay"]
    # the learning-rate protocol in each regime: the main arms choose on the validation split, the ablations run at
    # ExGRPO's choice
    assert report["settings"]["learning_rates"]["choices"] == [1e-4, 3e-4]
    for name, regime in report["regimes"].items():
        choice = regime["learning_rate_choice"]
        assert list(choice) == (["grpo", "exgrpo", "exgrpo_no_replay"] if name == "scarce" else list(plentiful))
        for arm, c in choice.items():
            best = max(v["accuracy"] for v in c["validation"].values())
            assert c["validation"][f"{c['chosen']:g}"]["accuracy"] == best
            (run,) = report["runs"][name][arm]
            assert run["extra_overrides"][-2:] == ["--learning_rate", f"{c['chosen']:g}"]
            assert run["config"]["learning_rate"] == c["chosen"]
    exgrpo_rate = report["regimes"]["scarce"]["learning_rate_choice"]["exgrpo"]["chosen"]
    assert scarce["exgrpo_no_shaping"][0]["extra_overrides"][-2:] == ["--learning_rate", f"{exgrpo_rate:g}"]
    # the plentiful regime's GRPO trains as benchmark 2's, tracked alike here (smoke settings): found in the cache
    assert grpo["cached"] is True and "reusing the cached run" in logs["bench_experience"]
    assert exgrpo["cached"] is False
    # the scarce regime trains the weaker model on fewer problems
    assert exgrpo["model"] != grpo["model"] and "weak-model" in exgrpo["model"]["path"]
    assert exgrpo["num_train_problems"] == 800 and grpo["num_train_problems"] == 2000
    assert exgrpo["rollouts_generated"] == 128
    assert exgrpo["fresh_rollouts_used"] == exgrpo["rollouts_generated"] - exgrpo["rollouts_replayed"]
    assert exgrpo["questions"]["source"] == "trainer"  # ExGRPO's own counts of what it trained on
    assert exgrpo["questions"]["distinct_questions"] == exgrpo["curve"][-1]["distinct_questions"] > 0
    assert no_replay["config"]["replay_ratio"] == 0.0 and no_replay["rollouts_replayed"] == 0
    assert scarce["exgrpo_no_shaping"][0]["config"]["replay_policy_shaping"] is False
    assert plentiful["exgrpo_requeue"][0]["config"]["displaced_questions"] == "requeue"
    for regime in report["regimes"].values():
        assert [p["step"] for p in regime["equal_rollouts"]] == [0, 1, 2]
    assert set(report["targets"]) == {"scarce_rollouts", "scarce_gain", "plentiful_best"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert report["weak_model"]["pretraining"]["arguments"]["steps"] == 2


def test_target_distribution_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "target_distribution")
    # benchmark 2's learning-rate protocol, found in the cache: two rates per arm in smoke mode
    assert logs["bench_target_distribution"].count("reusing the cached run") == 2 * len(bdm.ARMS)
    assert report["settings"]["learning_rates"]["choices"] == [1e-4, 3e-4]
    assert list(report["summary"]) == list(bdm.ARMS) == list(report["example"]["policies"])
    for name in bdm.ARMS:
        summary = report["summary"][name]
        assert 0.0 <= summary["tv"]["mean"] <= 1.0 and summary["kl"]["mean"] >= 0.0
        assert 0.0 < summary["policy_mass"]["mean"] <= 1.0
        assert sum(report["example"]["policies"][name]) == pytest.approx(1.0)
        assert summary["reference_mass"]["mean"] == pytest.approx(report["reference"]["mass"])
    assert report["anchors"]["collapsed"]["tv"] > report["anchors"]["uniform"]["tv"] > 0.0
    assert sum(report["example"]["reference"]) == pytest.approx(1.0)
    # issue 9's TV bound, checked on these problems too
    tv_targets = {(t["arm"], t["role"]): t["check"] for t in report["tv_targets"]}
    assert set(tv_targets) == {("flowrl_matching", "target")}
    check = tv_targets[("flowrl_matching", "target")]
    assert check["value"] == report["summary"]["flowrl_matching"]["tv"]["mean"] and check["threshold"] == 0.3
    assert check["met"] == (check["value"] <= 0.3)


def test_replay_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "replay")
    assert list(report["runs"]) == ["flowrl_matching", "flowrl_matching_replay"]
    (plain,), (replay,) = report["runs"].values()
    assert replay["config"]["replay_share"] == 0.5 and plain["config"]["replay_share"] == 0.0
    assert plain["config"]["learning_rate"] == replay["config"]["learning_rate"] == 1e-4
    # 8 groups per step: all generated at the first step (the store is empty), fewer at the second
    assert [p["rollouts_generated"] for p in plain["curve"]] == [0, 64, 128]
    assert replay["curve"][1]["rollouts_generated"] == 64 < replay["curve"][2]["rollouts_generated"] < 128
    for run in (plain, replay):
        seconds = [p["train_seconds"] for p in run["curve"]]
        assert seconds[0] == 0.0 and seconds[1] > 0 and seconds[2] > seconds[1]
    assert set(report["checks"]) == {"rollouts_ratio", "paths", "tv", "wall_time_ratio", "step_time_ratio"}
    for check in report["checks"].values():
        assert check["met"] == (check["value"] is not None and _holds(check))
    assert "rollouts_ratio:" in logs["bench_replay"]


def _holds(check: dict) -> bool:
    value, threshold = check["value"], check["threshold"]
    return {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[check["comparison"]]


def test_pass_at_k_smoke(smoke_outputs):
    output_dir, logs = smoke_outputs
    report = _load(output_dir, "pass_at_k")
    assert list(report["summary"]) == ["grpo", "flowrl_matching"]
    samples = report["settings"]["samples"]
    assert samples == 4 and len(report["initial"]["pass_at_k"]) == samples
    for runs in report["runs"].values():
        (run,) = runs
        curve = run["pass_at_k"]
        assert len(curve) == samples and all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))  # pass@k grows with k
        # the unbiased estimator at k = n is the share of problems with a correct sample
        assert curve[-1] == pytest.approx(sum(c > 0 for c in run["num_correct"]) / len(run["num_correct"]))
        assert curve[0] == pytest.approx(run["accuracy"])  # pass@1 is the mean correctness
        assert run["train_seconds"] > 0 and run["eval_seconds"] > 0
    (evaluation,) = report["evaluations"]
    assert evaluation["arm"] == "flowrl_matching" and evaluation["role"] == "target"
    assert evaluation["met"] == all(c["met"] for c in evaluation["checks"].values())
    assert "FlowRL matching (beta 15) against GRPO (target)" in logs["bench_pass_at_k"]


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
    assert "with `python benchmarks/bench_experience.py --smoke`" in text  # the recorded command
    for heading in (
        "### 2. Distribution matching",
        "### 3. Experience: ExGRPO vs GRPO",
        "### 4. Distance to FlowRL",
        "### 6. pass@k on the programming task",
        "### 7. Replay of past rollouts",
    ):
        assert heading in text
    columns = " | ".join(LABELS[name] for name in bdm.ARMS)
    assert f"| at the end of training, mean (per seed) | initial | {columns} |" in text  # one column per arm
    assert f"| final policy, mean (per seed) | {columns} |" in text
    assert "Targets (issue 18), FlowRL matching (beta 15) against GRPO: **" in text
    assert "The former target of issue 9, FlowRL matching (beta 15) against GRPO" in text
    assert "`--objective matching --beta 15`" in text  # what each arm is
    assert "Issue 18's bound on these problems, FlowRL matching (beta 15) (target):" in text
    # the learning-rate choice: benchmark 2's table and one per regime of benchmark 3
    assert text.count("| arm | initial | lr 0.0001 | lr 0.0003 | chosen |") == 3
    assert "chosen per arm and regime on a validation split" in text
    assert "The ablations run at ExGRPO's chosen rate" in text
    (requeue,) = [  # its row of the plentiful regime's table (its learning-rate row has 5 cells)
        line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| ExGRPO, displaced questions requeued |") and line.count(" | ") > 4
    ]
    assert requeue[4] == "-"  # minus ExGRPO: in the plentiful regime it is a main arm, not an ablation
    assert "distribution_matching_tradeoff.png" in text
    assert "Not run yet: benchmark 1 (overhead)" in text  # no overhead.json here: skipped, and said so
    assert text.count("Smoke run") == 5
    assert "](" in text and "distribution_matching.png" in text
    assert _table_rows_off_header(text) == []  # every cell of every table under a header
    first = text
    subprocess.run([*command, "--readme", str(readme)], check=True, capture_output=True, timeout=60)
    assert readme.read_text() == first

    readme.write_text("# no markers\n")
    result = subprocess.run([*command, "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "results:start" in result.stderr
    assert readme.read_text() == "# no markers\n"


def test_overhead_smoke(tmp_path):
    """Benchmark 1 in `--smoke` mode: six trainers, one fresh process each, and the report the writer renders."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_overhead.py"), "--smoke", "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "target flowrl_matching/grpo_kl <= 1.03" in result.stdout and "target exgrpo/grpo <= 1.05" in result.stdout
    assert "target flowrl_matching/flowrl_matching_head <= 1.00" in result.stdout
    report = _load(tmp_path, "overhead")
    assert set(report["summary"]) == {
        "grpo",
        "grpo_kl",
        "flowrl",
        "flowrl_matching",
        "flowrl_matching_head",
        "exgrpo",
    }
    for name, summary in report["summary"].items():
        assert summary["step_time_s"] > 0 and summary["peak_memory_mb"] > 0, name
        assert len(report["runs"][name]) == 1 and len(report["runs"][name][0]["step_times"]) == 2
    flowrl, grpo_kl = report["summary"]["flowrl"]["step_time_s"], report["summary"]["grpo_kl"]["step_time_s"]
    assert report["step_time_ratios"]["flowrl/grpo_kl"] == pytest.approx(flowrl / grpo_kl)
    assert report["targets"]["flowrl/grpo_kl"]["met"] == (flowrl / grpo_kl <= 1.03)
    assert report["runs"]["exgrpo"][0]["entropy_scoring_s"]  # ExGRPO replayed (and scored entropy)
    lines = write_results.render_overhead(report, tmp_path, tmp_path, "overhead")
    assert any(line.startswith("| FlowRL official |") for line in lines)
    assert any(line.startswith("| FlowRL matching, log Z head |") for line in lines)
    assert any("Target flowrl/grpo_kl <= 1.03" in line for line in lines)


# -- the enumerable toy of the matching preset ----------------------------------------------------------------------


def test_matching_toy_distance_is_exact_and_the_smoke_run_writes_its_report(tmp_path):
    import bench_matching_toy as toy_bench
    import torch

    toy = toy_bench.Toy("unequal", pretrain_steps=30)
    assert len(set(toy.answers)) == 16 and len({len(a) for a in toy.answers}) > 1
    reference = toy.valid_logps(toy.reference).exp().double()
    mass = float(reference.sum())
    for beta in (5.0, 15.0):
        # p* over the 16 answers and "anything else": pi_ref * e^beta on the answers, pi_ref on the rest
        norm = mass * math.exp(beta) + (1 - mass)
        target = [*(reference * math.exp(beta) / norm).tolist(), (1 - mass) / norm]
        policy = [*reference.tolist(), 1 - mass]
        distance = toy.distance(toy.reference, beta)
        assert distance["tv"] == pytest.approx(0.5 * sum(abs(p - q) for p, q in zip(policy, target)), rel=1e-6)
        assert distance["tv_among_valid"] == pytest.approx(0.0, abs=1e-12)  # the reference's own proportions
        assert distance["valid_mass"] == pytest.approx(mass)
    # sampling: a completion stops at its end token (not kept), or is cut after `width` tokens and marked with None
    width = toy.max_length + 1
    rows = toy_bench.sample(toy.reference, 64, width, torch.Generator().manual_seed(0))
    assert len(rows) == 64
    for row in rows:
        if row and row[-1] is None:
            assert len(row) == width + 1 and toy_bench.EOS not in row[:-1]
        else:
            assert len(row) < width and toy_bench.EOS not in row  # any other token (even BOS) is sampled from pi
    # a packed answer's masked log-probs are the ones the distance sums (tokens and end token, no padding)
    ids, mask = toy_bench.pack(toy.answers[:2], width)
    assert mask.sum(-1).tolist() == [len(a) + 1 for a in toy.answers[:2]]
    assert (ids[:, 0] == toy_bench.BOS).all()

    report = toy_bench.main(["--smoke", "--output-dir", str(tmp_path)])
    assert [run["arm_name"] for run in report["runs"]] == ["length, clip 1", "sum, clip 1"]
    assert all(0.0 <= run["tv"] <= 1.0 for run in report["runs"])
    assert (tmp_path / "matching_toy_smoke.png").stat().st_size > 1000
    long = toy_bench.main(["--long", "--smoke", "--output-dir", str(tmp_path)])
    assert [row["tokens"] for row in long["rows"]] == [64, 128]
    # the summed residual's gradient is the length-divided one's times about n^2 (equal lengths, same residuals)
    for row in long["rows"]:
        assert row["sum"]["grad_norm"] > row["tokens"] * row["length"]["grad_norm"]
