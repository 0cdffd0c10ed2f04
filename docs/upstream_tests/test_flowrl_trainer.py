import os

import pytest
import torch
from datasets import load_dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils import is_peft_available

from trl import GRPOConfig
from trl.experimental.flowrl import FlowRLConfig, FlowRLTrainer
from trl.experimental.flowrl.flowrl_trainer import LOG_Z_STATE_NAME

from ..testing_utils import TrlTestCase, require_peft


if is_peft_available():
    from peft import LoraConfig


class TestFlowRLConfig:
    def test_defaults_are_the_papers(self):
        args = FlowRLConfig("dummy")
        assert args.beta == 15.0  # the paper's ablation optimum; a reward scale, not a KL coefficient
        assert args.importance_weight_clipping == "clamp"  # min(w, 10), as the official code
        assert args.importance_weight_max == 10.0

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"beta": 0.0},  # the target pi_ref * exp(beta * r) needs a positive reward scale
            {"entropy_coef": 0.01},  # FlowRL's loss has no entropy term
            {"top_entropy_quantile": 0.2},  # token masking of GRPO's per-token loss
            {"off_policy_mask_threshold": 0.5},
            {"importance_weight_clipping": "clip"},
        ],
    )
    def test_unsupported_settings_are_refused(self, kwargs):
        with pytest.raises(ValueError):
            FlowRLConfig("dummy", **kwargs)


class TestFlowRLTrainer(TrlTestCase):
    def test_grpo_config_is_refused(self):
        with pytest.raises(TypeError, match="FlowRLConfig"):
            FlowRLTrainer(
                model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
                reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
                args=GRPOConfig(output_dir=self.tmp_dir, report_to="none"),
            )

    def test_train(self):
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")

        training_args = FlowRLConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            report_to="none",
        )
        trainer = FlowRLTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
        )

        previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
        previous_head_params = {n: param.clone() for n, param in trainer.log_z_head.named_parameters()}

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert any("flowrl/log_z/mean" in log for log in trainer.state.log_history)

        # Check that the params of the policy and of the log Z head have changed
        for n, param in previous_trainable_params.items():
            new_param = trainer.model.get_parameter(n)
            assert not torch.equal(param, new_param), f"Parameter {n} has not changed."
        for n, param in previous_head_params.items():
            new_param = trainer.log_z_head.get_parameter(n)
            assert not torch.equal(param, new_param), f"Log Z head parameter {n} has not changed."

    @pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
    def test_train_conversational(self, config_name):
        dataset = load_dataset("trl-internal-testing/zen", config_name, split="train")

        training_args = FlowRLConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            report_to="none",
        )
        trainer = FlowRLTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
        )

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None

    def test_train_off_policy_weights_the_residual(self):
        # With two optimizer steps per generation the second one is off-policy: its importance weight is not 1.
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")

        training_args = FlowRLConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            num_iterations=2,  # the importance sampling weights won't be 1 in this case
            max_steps=4,
            logging_steps=1,
            report_to="none",
        )
        trainer = FlowRLTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
        )

        trainer.train()

        weights = [
            log["flowrl/importance_weight/mean"]
            for log in trainer.state.log_history
            if "flowrl/importance_weight/mean" in log
        ]
        assert len(weights) == 4
        assert any(abs(weight - 1.0) > 1e-3 for weight in weights)

    def test_checkpoint_holds_the_log_z_head_and_the_model_does_not(self):
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")

        training_args = FlowRLConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            max_steps=2,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
        )
        trainer = FlowRLTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
        )

        trainer.train()

        checkpoint = os.path.join(self.tmp_dir, "checkpoint-2")
        state = torch.load(os.path.join(checkpoint, LOG_Z_STATE_NAME), weights_only=True)
        for n, param in trainer.log_z_head.named_parameters():
            torch.testing.assert_close(state["head"][n], param.detach().cpu())
        with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
            assert not any("log_z" in key for key in f.keys())
        # The saved policy is a plain causal LM
        AutoModelForCausalLM.from_pretrained(checkpoint)

    @require_peft
    def test_train_peft_config(self):
        # With an adapter, the reference log-probs come from the model with the adapter disabled
        model = AutoModelForCausalLM.from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", dtype="float32")
        base_param_names = [f"base_model.model.{n}" for n, _ in model.named_parameters()]
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")

        training_args = FlowRLConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            report_to="none",
        )
        trainer = FlowRLTrainer(
            model=model,
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
            peft_config=LoraConfig(),
        )

        previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None

        # Check that the peft params have changed and the base model params have not changed
        for n, param in previous_trainable_params.items():
            new_param = trainer.model.get_parameter(n)
            if n in base_param_names:  # We expect the base model params to be the same
                torch.testing.assert_close(param, new_param, msg=f"Parameter {n} has changed.")
            elif "base_layer" not in n:  # We expect the peft params to be different (except for the base layer)
                assert not torch.equal(param, new_param), f"Parameter {n} has not changed."
