"""ExGRPOConfig: paper defaults and one message per invalid setting."""

import pytest

from trl_flowrl.exgrpo import ExGRPOConfig


def make(**kwargs):
    defaults = dict(
        output_dir="unused",
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
    )
    return ExGRPOConfig(**{**defaults, **kwargs})


def test_paper_defaults():
    config = make()
    assert config.replay_ratio == 0.5
    assert config.delayed_start_threshold == 0.35
    assert config.replay_weight_shaping == 0.1
    assert config.bucket_center is None and config.bucket_width == 1.0
    assert config.trajectory_selection == "lowest_entropy"
    assert config.retire_solved_questions and config.unclip_fresh_after_switch
    assert config.success_threshold == 1.0
    assert config.max_trajectories_per_question is None and config.max_buffer_trajectories is None
    # Defaults that differ from GRPOConfig
    assert config.scale_rewards == "none"
    assert config.loss_type == "dr_grpo"


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo", "bnpo", "grpo"])
def test_supported_loss_types(loss_type):
    assert make(loss_type=loss_type).loss_type == loss_type


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replay_ratio": -0.1}, "replay_ratio must be in"),
        ({"replay_ratio": 1.5}, "replay_ratio must be in"),
        ({"delayed_start_threshold": 1.2}, "delayed_start_threshold must be in"),
        ({"replay_weight_shaping": 0.0}, "replay_weight_shaping must be > 0"),
        ({"bucket_width": 0.0}, "bucket_width must be > 0"),
        ({"bucket_center": 5.0}, "bucket_center must be between 0 and num_generations"),
        ({"trajectory_selection": "median"}, "trajectory_selection must be one of"),
        ({"max_trajectories_per_question": 0}, "max_trajectories_per_question must be None"),
        ({"max_buffer_trajectories": 0}, "max_buffer_trajectories must be None"),
        ({"loss_type": "cispo"}, "ExGRPO supports loss_type"),
        ({"loss_type": "sapo"}, "ExGRPO supports loss_type"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile < 1"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='token'"),
        ({"delta": 4.0}, "two-sided clipping"),
        ({"success_threshold": float("nan")}, "success_threshold must be a finite number >= 0"),
        ({"success_threshold": -1.0}, "success_threshold must be a finite number >= 0"),
        ({"success_threshold": float("inf")}, "success_threshold must be a finite number >= 0"),
        ({"replay_ratio": float("nan")}, "replay_ratio must be in"),
        ({"replay_weight_shaping": float("inf")}, "replay_weight_shaping must be > 0"),
        ({"question_selection": "hardest"}, "question_selection must be one of"),
        ({"displaced_questions": "keep"}, "displaced_questions must be one of"),
    ],
)
def test_invalid_settings_fail_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


@pytest.mark.parametrize("per_device_train_batch_size", [2, 6])
def test_a_group_split_across_processes_is_refused(monkeypatch, per_device_train_batch_size):
    # Two processes: a generation batch of 4 or 12 rows holds whole groups of 4 (TRL accepts it), but each process's
    # 2 or 6 rows do not, so a group would straddle the processes.
    monkeypatch.setattr(ExGRPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="per-device generation batch .* must be a multiple of num_generations"):
        make(per_device_train_batch_size=per_device_train_batch_size)


def test_a_generation_batch_of_whole_groups_spread_over_accumulation_steps_is_valid():
    # 2 rows per step, 2 steps per generation: 4 rows, one group per process
    config = make(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert config.steps_per_generation == 2
