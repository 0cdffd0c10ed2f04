import pytest
from trl import GRPOConfig

from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl._compat import SUPPORTED_TRL, check_trl_version


def make_config(tmp_path, **kwargs):
    return FlowRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs)


def test_defaults_follow_the_paper(tmp_path):
    config = make_config(tmp_path)
    assert config.beta == 15.0
    assert config.importance_weight_clipping == "clamp" and config.importance_weight_max == 10.0
    assert config.reward_in_residual == "advantage"
    assert (config.log_z_num_layers, config.log_z_dropout, config.log_z_pooling) == (3, 0.1, "mean")
    assert config.log_z_learning_rate is None
    assert config.scale_rewards == "group"  # r_i is the group-normalised reward
    assert config.objective == "official"
    assert (config.residual_normalization, config.log_z_estimate) == ("token_mean", "head")
    assert config.loss_type is None and config.importance_sampling_level is None
    assert config.use_bias_correction_kl is False and config.delta is None


def test_matching_preset_and_explicit_values_win(tmp_path):
    config = make_config(tmp_path, objective="matching")
    assert config.beta == 15.0  # the same number as the official objective, in another role
    assert (config.residual_normalization, config.reward_in_residual, config.log_z_estimate) == (
        "sum",
        "reward",
        "group",
    )
    config = make_config(
        tmp_path, objective="matching", beta=8.0, residual_normalization="length", log_z_estimate="head"
    )
    assert (config.beta, config.residual_normalization, config.log_z_estimate) == (8.0, "length", "head")
    assert config.reward_in_residual == "reward"  # still the preset's
    # the official preset leaves explicit ingredients alone too
    assert make_config(tmp_path, reward_in_residual="reward").residual_normalization == "token_mean"


@pytest.mark.parametrize("max_grad_norm", [0.0, None])
def test_summed_residual_without_clipping_warns(tmp_path, caplog, max_grad_norm):
    with caplog.at_level("WARNING", logger="trl_flowrl.flowrl.flowrl_config"):
        make_config(tmp_path, objective="matching", max_grad_norm=max_grad_norm)
    assert "no gradient clipping" in caplog.text and "max_grad_norm" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_flowrl.flowrl.flowrl_config"):
        make_config(tmp_path, objective="matching")  # TRL's default max_grad_norm=1.0
        make_config(tmp_path, objective="matching", residual_normalization="length", max_grad_norm=0.0)
    assert "no gradient clipping" not in caplog.text


def test_group_estimate_needs_whole_groups_on_each_process(tmp_path, monkeypatch):
    # Two processes with 2 completions each: TRL accepts the global batch of 4 = num_generations, but each process
    # would hold half a group.
    monkeypatch.setattr(FlowRLConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="must be a multiple of num_generations"):
        make_config(tmp_path, objective="matching", per_device_train_batch_size=2, num_generations=4)
    make_config(tmp_path, objective="official", per_device_train_batch_size=2, num_generations=4)


def test_recipe_refuses_a_non_finite_beta():
    from pathlib import Path

    from trl_flowrl.recipe import parse_recipe_args

    embedded = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "embedded" / "flowrl_arithmetic.yaml"
    for value in ("nan", "inf"):
        with pytest.raises(ValueError, match="positive and finite"):
            parse_recipe_args(FlowRLConfig, embedded, argv=["--beta", value, "--use_cpu", "true"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta is the reward scale"),
        ({"beta": -1.0}, "must be positive"),
        ({"beta": float("nan")}, "positive and finite"),
        ({"beta": float("inf")}, "positive and finite"),
        ({"objective": "reverse_kl"}, "objective must be one of"),
        ({"residual_normalization": "mean"}, "residual_normalization must be"),
        ({"log_z_estimate": "mlp"}, "log_z_estimate must be"),
        ({"importance_weight_max": float("nan")}, "importance_weight_max must be positive and finite"),
        ({"log_z_learning_rate": float("nan")}, "log_z_learning_rate must be positive and finite"),
        ({"log_z_learning_rate": 1e-3, "log_z_estimate": "group"}, "has no head"),
        ({"loss_type": "dapoo"}, "not one of GRPO's loss types"),
        ({"importance_sampling_level": "tokens"}, "importance_sampling_level must be 'token' or 'sequence'"),
        ({"delta": 2.0, "importance_weight_clipping": "none"}, "leaves FlowRL's sequence weight unbounded"),
        ({"importance_weight_clipping": "soft"}, "importance_weight_clipping must be"),
        ({"importance_weight_max": 0.0}, "importance_weight_max must be positive"),
        ({"importance_weight_clipping": "symmetric", "epsilon": 1.5}, "epsilon must be in"),
        ({"importance_weight_clipping": "symmetric", "epsilon_high": -1.5}, "epsilon_high must be positive"),
        ({"importance_weight_clipping": "symmetric", "epsilon_high": float("nan")}, "epsilon_high must be positive"),
        ({"importance_weight_clipping": "symmetric", "epsilon_high": float("inf")}, "and finite"),
        ({"importance_weight_clipping": "symmetric", "epsilon_high": 0.0}, "epsilon_high must be positive"),
        ({"reward_in_residual": "logit"}, "reward_in_residual must be"),
        ({"log_z_num_layers": 0}, "log_z_num_layers must be at least 1"),
        ({"log_z_dropout": 1.0}, "log_z_dropout must be in"),
        ({"log_z_pooling": "max"}, "log_z_pooling must be"),
        ({"log_z_learning_rate": -1e-3}, "log_z_learning_rate must be positive"),
        ({"entropy_coef": 0.01}, "no entropy term"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
    ],
)
def test_invalid_configs_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **kwargs)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo", "cispo", "luspo", "vespo"])
def test_grpo_loss_options_are_ignored_with_one_warning(tmp_path, caplog, loss_type):
    # What a GRPO script or YAML commonly spells out, GRPO's own defaults included (loss_type 'dapo',
    # use_bias_correction_kl True): accepted, named once, and reset so that GRPOTrainer's checks of them stay silent.
    with caplog.at_level("WARNING", logger="trl_flowrl.flowrl.flowrl_config"):
        config = make_config(
            tmp_path,
            loss_type=loss_type,
            importance_sampling_level="sequence",
            delta=4.0,
            use_bias_correction_kl=True,
            epsilon_high=0.28,
        )
    warnings = [r.getMessage() for r in caplog.records if r.name == "trl_flowrl.flowrl.flowrl_config"]
    assert len(warnings) == 1
    for name in (f"loss_type={loss_type!r}", "importance_sampling_level='sequence'", "delta=4.0"):
        assert name in warnings[0]
    assert "use_bias_correction_kl=True (FlowRL adds no KL term" in warnings[0]
    assert "epsilon_high=0.28 (it bounds the weight only with importance_weight_clipping='symmetric'" in warnings[0]
    assert (config.loss_type, config.importance_sampling_level, config.delta, config.epsilon_high) == (None,) * 4
    assert config.use_bias_correction_kl is False
    # FlowRL's own settings are untouched
    assert (config.importance_weight_clipping, config.importance_weight_max) == ("clamp", 10.0)


def test_defaults_and_flowrl_settings_give_no_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trl_flowrl.flowrl.flowrl_config"):
        make_config(tmp_path)
        # epsilon_high is FlowRL's own bound with symmetric clipping; GRPO's use_bias_correction_kl=False is no change
        config = make_config(
            tmp_path, importance_weight_clipping="symmetric", epsilon_high=0.28, use_bias_correction_kl=False
        )
    assert not [r for r in caplog.records if r.name == "trl_flowrl.flowrl.flowrl_config"]
    assert config.epsilon_high == 0.28


def test_a_grpo_yaml_with_its_loss_options_parses(tmp_path, caplog):
    from trl import TrlParser

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        "output_dir: out\nuse_cpu: true\nbf16: false\nreport_to: none\nloss_type: dapo\n"
        "importance_sampling_level: token\nuse_bias_correction_kl: true\n"
    )
    with caplog.at_level("WARNING", logger="trl_flowrl.flowrl.flowrl_config"):
        (config,) = TrlParser((FlowRLConfig,)).parse_args_and_config(["--config", str(recipe)])
    assert config.loss_type is None and config.use_bias_correction_kl is False
    assert "loss_type='dapo'" in caplog.text and "importance_sampling_level='token'" in caplog.text


@pytest.mark.parametrize("clipping", ["clamp", "symmetric"])
def test_delta_is_ignored_where_the_weight_is_bounded(tmp_path, clipping):
    assert make_config(tmp_path, delta=4.0, importance_weight_clipping=clipping).delta is None


def test_eval_group_estimate_needs_whole_groups_on_each_process(tmp_path, monkeypatch):
    monkeypatch.setattr(FlowRLConfig, "world_size", property(lambda self: 2))
    evaluation = dict(objective="matching", eval_strategy="steps", eval_steps=1, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="per_device_eval_batch_size \\(2\\) must be a multiple"):
        make_config(tmp_path, per_device_eval_batch_size=2, num_generations=4, num_generations_eval=4, **evaluation)
    make_config(tmp_path, per_device_eval_batch_size=2, num_generations=4, num_generations_eval=2, **evaluation)


def test_trainer_refuses_a_grpo_config(tmp_path, tiny_model_path):
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="Replace GRPOConfig"):
        FlowRLTrainer(
            model=tiny_model_path, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args
        )


def test_trainer_refuses_a_model_instance_without_a_path(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config.name_or_path = ""
    with pytest.raises(ValueError, match="needs reference log-probs"):
        FlowRLTrainer(
            model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=make_config(tmp_path)
        )


def test_trl_version_outside_the_supported_range_fails_fast():
    check_trl_version("1.16.0")
    check_trl_version("1.16.3")
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=rf"supports trl{SUPPORTED_TRL} but found trl {version}"):
            check_trl_version(version)
