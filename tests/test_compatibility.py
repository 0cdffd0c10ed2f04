"""The README's compatibility table, row by row: each GRPOTrainer feature either trains with both trainers or is
refused with a reason, exactly as the table says. (Rows covered elsewhere name their test in the README.)"""

import pytest
import torch
from conftest import needs_transformers_5_18
from datasets import Dataset
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForSequenceClassification

from trl_flowrl import ExGRPOConfig, ExGRPOTrainer, FlowRLConfig, FlowRLTrainer
from trl_flowrl.tiny_models import build_char_tokenizer


TRAINERS = {"flowrl": (FlowRLTrainer, FlowRLConfig), "exgrpo": (ExGRPOTrainer, ExGRPOConfig)}


def parity_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def length_reward(completion_ids, **kwargs):
    return [len(ids) / 8 for ids in completion_ids]


def prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(n)])


def train(name, model, tmp_path, reward_funcs=parity_reward, dataset=None, trainer_kwargs=None, **config_kwargs):
    trainer_cls, config_cls = TRAINERS[name]
    config = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    config.update(config_kwargs)
    if name == "exgrpo":
        config.setdefault("delayed_start_threshold", 0.0)  # so that replay takes part in the run
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_funcs,
        args=config_cls(**config),
        train_dataset=prompts() if dataset is None else dataset,
        **(trainer_kwargs or {}),
    )
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainer.state.global_step == config["max_steps"]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no trainable parameter changed"
    return trainer


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-reward-model")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = build_char_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", TRAINERS)
def test_reward_model_beside_a_reward_function_with_weights(name, tiny_model_path, reward_model_path, tmp_path):
    trainer = train(
        name, tiny_model_path, tmp_path, reward_funcs=[reward_model_path, parity_reward], reward_weights=[0.5, 1.0]
    )
    assert "rewards/parity_reward/mean" in trainer.state.log_history[0]


@pytest.mark.parametrize("name", TRAINERS)
def test_several_reward_functions_and_multi_objective_aggregation(name, tiny_model_path, tmp_path):
    train(
        name,
        tiny_model_path,
        tmp_path,
        reward_funcs=[parity_reward, length_reward],
        multi_objective_aggregation="normalize_then_sum",
    )


@pytest.mark.parametrize("name", TRAINERS)
def test_peft_lora(name, tiny_model_path, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = train(name, tiny_model_path, tmp_path, trainer_kwargs={"peft_config": lora})
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled


@pytest.mark.parametrize("name", TRAINERS)
def test_model_instance_and_processing_class(name, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)  # name_or_path is the local path
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    train(name, model, tmp_path, trainer_kwargs={"processing_class": tokenizer})


@pytest.mark.parametrize("name", TRAINERS)
def test_iterable_train_dataset(name, tiny_model_path, tmp_path):
    train(name, tiny_model_path, tmp_path, dataset=prompts().to_iterable_dataset())


@pytest.mark.parametrize("name", TRAINERS)
def test_eval_dataset_and_evaluation_loop(name, tiny_model_path, tmp_path):
    trainer = train(
        name,
        tiny_model_path,
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        trainer_kwargs={"eval_dataset": prompts(4)},
    )
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("name", TRAINERS)
def test_several_iterations_per_generation_and_truncation_masking(name, tiny_model_path, tmp_path):
    train(name, tiny_model_path, tmp_path, num_iterations=2, mask_truncated_completions=True, max_completion_length=4)


@pytest.mark.parametrize("name", TRAINERS)
def test_completions_logging(name, tiny_model_path, tmp_path):
    trainer = train(name, tiny_model_path, tmp_path, log_completions=True)
    assert len(trainer._logs["prompt"]) > 0


@needs_transformers_5_18
@pytest.mark.parametrize("name", TRAINERS)
def test_mixture_of_experts_router_loss(name, moe_model_path, tmp_path):
    trainer = train(name, moe_model_path, tmp_path)
    assert trainer.aux_loss_enabled
    assert all(entry["aux_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_flowrl_runs_a_grpo_script_that_sets_grpo_loss_options(tiny_model_path, tmp_path, caplog):
    # A GRPO script's loss options (luspo with token-level ratios would even draw GRPOTrainer's own warning) are
    # reported once and change nothing: the run is the one without them.
    grpo_options = dict(
        loss_type="luspo", importance_sampling_level="token", delta=4.0, use_bias_correction_kl=True, epsilon_high=0.28
    )
    with caplog.at_level("WARNING"):
        with_options = train("flowrl", tiny_model_path, tmp_path / "with", num_iterations=2, **grpo_options)
    ignored = [r.getMessage() for r in caplog.records if "FlowRL ignores these GRPO loss options" in r.getMessage()]
    assert len(ignored) == 1 and all(name in ignored[0] for name in grpo_options)
    assert "luspo" not in caplog.text.replace(ignored[0], "")  # GRPOTrainer saw no loss_type to warn about
    without = train("flowrl", tiny_model_path, tmp_path / "without", num_iterations=2)
    for (name, a), b in zip(with_options.model.state_dict().items(), without.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "name, config_kwargs, trainer_kwargs, message",
    [
        ("flowrl", {"loss_type": "dapoo"}, {}, "not one of GRPO's loss types"),
        ("flowrl", {"delta": 4.0, "importance_weight_clipping": "none"}, {}, "weight unbounded"),
        ("flowrl", {"entropy_coef": 0.01}, {}, "no entropy term"),
        ("exgrpo", {"use_adaptive_entropy": True}, {}, "use_adaptive_entropy"),
        ("exgrpo", {"loss_type": "cispo"}, {}, "ExGRPO supports loss_type"),
        ("exgrpo", {}, {"tools": [len]}, "does not support `tools`"),
        ("exgrpo", {}, {"environment_factory": object}, "does not support `environment_factory`"),
        ("exgrpo", {}, {"rollout_func": lambda prompts, trainer: {}}, "does not support `rollout_func`"),
    ],
)
def test_refused_features_say_why(name, config_kwargs, trainer_kwargs, message, tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(name, tiny_model_path, tmp_path, trainer_kwargs=trainer_kwargs, **config_kwargs)
