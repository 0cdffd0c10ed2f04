import os

import pytest
import torch
from datasets import load_dataset
from transformers import TrainerCallback

from trl import GRPOConfig
from trl.experimental.exgrpo import ExGRPOConfig, ExGRPOTrainer
from trl.experimental.exgrpo.exgrpo_trainer import REPLAY_STATE_NAME

from ..testing_utils import TrlTestCase


def parity_reward(completion_ids, **kwargs):
    # Deterministic and correct for about half of the completions of a random model: most groups are partially solved,
    # which is what the replay buffer stores
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


class TestExGRPOConfig:
    def test_defaults_are_the_papers(self):
        args = ExGRPOConfig("dummy")
        assert args.replay_ratio == 0.5
        assert args.delayed_start_threshold == 0.35
        assert args.replay_weight_shaping == 0.1
        assert args.trajectory_selection == "lowest_entropy"
        # Two GRPO defaults change: the advantage is reward - group mean, and the token losses are summed
        assert args.scale_rewards == "none"
        assert args.loss_type == "dr_grpo"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"replay_ratio": 1.5},
            {"replay_weight_shaping": 0.0},
            {"loss_type": "cispo"},  # replaces the per-token surrogate that ExGRPO re-weights
            {"importance_sampling_level": "sequence"},  # ExGRPO's importance weights are per token
            {"top_entropy_quantile": 0.5},
            {"off_policy_mask_threshold": 0.5},  # replayed trajectories are off-policy by design
        ],
    )
    def test_unsupported_settings_are_refused(self, kwargs):
        with pytest.raises(ValueError):
            ExGRPOConfig("dummy", **kwargs)


class TestExGRPOTrainer(TrlTestCase):
    def test_grpo_config_is_refused(self):
        with pytest.raises(TypeError, match="ExGRPOConfig"):
            ExGRPOTrainer(
                model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
                reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
                args=GRPOConfig(output_dir=self.tmp_dir, report_to="none"),
            )

    def test_train_iterable_dataset(self):
        # Replays come from the rows kept in the buffer, so a streamed dataset works too
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")
        training_args = ExGRPOConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,
            per_device_train_batch_size=3,
            num_generations=3,
            max_completion_length=8,
            max_steps=3,
            delayed_start_threshold=0.0,
            report_to="none",
        )
        trainer = ExGRPOTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset.to_iterable_dataset(),
        )
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] is not None

    def test_train(self):
        dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")

        training_args = ExGRPOConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            report_to="none",
        )
        trainer = ExGRPOTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5",
            args=training_args,
            train_dataset=dataset,
        )

        previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}

        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert any("replay/phase" in log for log in trainer.state.log_history)

        # Check that the params have changed
        for n, param in previous_trainable_params.items():
            new_param = trainer.model.get_parameter(n)
            assert not torch.equal(param, new_param), f"Parameter {n} has not changed."

    def test_train_replays_stored_successes(self):
        dataset = load_dataset("trl-internal-testing/zen", "conversational_prompt_only", split="train")

        training_args = ExGRPOConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=6,  # two questions per generation batch, so that one can be replayed
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            delayed_start_threshold=0.0,  # collect from the first step on
            max_steps=4,
            logging_steps=1,
            report_to="none",
        )
        trainer = ExGRPOTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs=parity_reward,
            args=training_args,
            train_dataset=dataset,
        )

        trainer.train()

        assert trainer.replay_buffer.replay_started
        assert trainer.replay_buffer.num_trajectories > 0
        replayed = [
            log["replay/replayed_questions_fraction"] for log in trainer.state.log_history if "replay/phase" in log
        ]
        assert replayed[0] == 0.0  # nothing is stored before the first generation batch
        assert max(replayed) == 0.5  # floor(replay_ratio * 2 questions) = 1 replayed question out of 2
        assert any("replay/shaped_weight_mean" in log for log in trainer.state.log_history)

    def test_resume_restores_the_replay_buffer(self):
        dataset = load_dataset("trl-internal-testing/zen", "conversational_prompt_only", split="train")

        training_args = ExGRPOConfig(
            output_dir=self.tmp_dir,
            learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
            per_device_train_batch_size=6,  # two questions per generation batch
            num_generations=3,  # reduce the number of generations to reduce memory usage
            max_completion_length=8,  # reduce the completion length to reduce memory usage
            delayed_start_threshold=0.0,  # collect from the first step on
            max_steps=3,
            save_strategy="steps",
            save_steps=3,
            report_to="none",
        )
        trainer = ExGRPOTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs=parity_reward,
            args=training_args,
            train_dataset=dataset,
        )
        trainer.train()
        checkpoint = os.path.join(self.tmp_dir, "checkpoint-3")
        assert os.path.isfile(os.path.join(checkpoint, REPLAY_STATE_NAME))
        assert trainer.replay_buffer.num_trajectories > 0

        resumed = ExGRPOTrainer(
            model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
            reward_funcs=parity_reward,
            args=training_args,
            train_dataset=dataset,
        )
        restored = {}

        class RecordBuffer(TrainerCallback):
            # The checkpoint is loaded before training begins; what the resumed run trains afterwards changes the buffer
            def on_train_begin(self, args, state, control, **kwargs):
                restored["replay_started"] = resumed.replay_buffer.replay_started
                restored["num_trajectories"] = resumed.replay_buffer.num_trajectories
                restored["questions"] = resumed.replay_buffer.eligible_questions()

        resumed.add_callback(RecordBuffer())
        resumed.train(resume_from_checkpoint=checkpoint)

        assert restored["replay_started"]
        assert restored["num_trajectories"] == trainer.replay_buffer.num_trajectories
        assert restored["questions"] == trainer.replay_buffer.eligible_questions()
