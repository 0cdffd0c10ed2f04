"""ExGRPOTrainer end to end on the tiny model: replay rows, the mixed loss, delayed start, retirement, resume."""

import math
import os
import re

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_flowrl.exgrpo import ExGRPOConfig, ExGRPOTrainer
from trl_flowrl.exgrpo.exgrpo_trainer import REPLAY_STATE_NAME, prompt_question_id


def parity_reward(completion_ids, **kwargs):
    """Correct when the token ids sum to an even number: about half of the random completions, deterministic."""
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def questions(n=16):
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "qid": f"q{a}{b}"} for a in range(4) for b in range(4)
    ]
    return Dataset.from_list(rows[:n])


def make_config(output_dir, **kwargs):
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # 16 rows, 4 groups of 4 per generation
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return ExGRPOConfig(**{**defaults, **kwargs})


class RecordingTrainer(ExGRPOTrainer):
    """Records, for every training generation batch, the buffer it drew from and what it produced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        buffer = {
            q: [(t.token_ids.tolist(), t.logps.clone()) for t in self.replay_buffer.trajectories(q)]
            for q in self.replay_buffer.eligible_questions()
        }
        output = super()._generate_and_score_completions(inputs)
        self.records.append(
            {
                "step": self.state.global_step,
                "buffer": buffer,
                "replay_started": self.replay_buffer.replay_started,
                "output": {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in output.items()},
            }
        )
        return output


def completion(output, row):
    return output["completion_ids"][row][output["completion_mask"][row].bool()]


def test_replayed_rows_carry_the_stored_trajectory_and_the_mixed_loss(tiny_model_path, tmp_path):
    # learning_rate=0 keeps the policy fixed, so stored log-probs and entropies can be recomputed exactly.
    args = make_config(tmp_path, learning_rate=0.0, delayed_start_threshold=0.0)
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    model = trainer.model
    K = 4

    replay_records = [r for r in trainer.records if r["output"]["replay_mask"].any()]
    assert len(replay_records) >= 2, "replay never happened: the test would check nothing"
    for record in trainer.records:
        output = record["output"]
        assert output["completion_ids"].size(0) == 16  # no process's row count changes
        # floor(0.5 * 4 groups) = 2 replayed questions, or fewer when the buffer holds fewer
        expected = min(2, len(record["buffer"])) if record is not trainer.records[0] else 0
        assert output["replay_mask"].sum().item() == expected
        assert not (output["collect_mask"] & output["replay_mask"]).any()  # only fresh rows are stored

    for record in replay_records:
        output = record["output"]
        with torch.no_grad():
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, output["completion_ids"].size(1)
            )
        for row in output["replay_mask"].nonzero().flatten().tolist():
            question_id = output["question_ids"][row]
            assert output["question_ids"][row - row % K : row - row % K + K] == [question_id] * K
            mask = output["completion_mask"][row].bool()
            ids = completion(output, row).tolist()
            stored = [lp for t, lp in record["buffer"][question_id] if t == ids]
            assert len(stored) == 1, "a replayed row must carry exactly a stored trajectory of its question"
            assert torch.equal(output["stored_per_token_logps"][row][mask], stored[0])
            assert not output["stored_per_token_logps"][row][~mask].any()
            # the stored log-probs are the generating policy's (the policy is fixed here)
            torch.testing.assert_close(stored[0], logps[row][mask], atol=1e-5, rtol=0)

            # lowest mean entropy under the current policy among the question's stored trajectories
            prompt = output["prompt_ids"][row][output["prompt_mask"][row].bool()]
            means = []
            for candidate, _ in record["buffer"][question_id]:
                sequence = torch.cat([prompt, torch.tensor(candidate)]).unsqueeze(0)
                with torch.no_grad():
                    _, entropy, _ = trainer._get_per_token_logps_and_entropies(
                        model, sequence, torch.ones_like(sequence), len(candidate), compute_entropy=True
                    )
                means.append(entropy.mean().item())
            assert means[[c for c, _ in record["buffer"][question_id]].index(ids)] <= min(means) + 1e-5

        # advantages are reward - group mean over the mixed group, replayed rows included (and correct)
        rewards = torch.tensor(parity_reward([completion(output, r).tolist() for r in range(16)]))
        assert (rewards[output["replay_mask"]] == 1).all()
        expected = rewards - rewards.view(-1, K).mean(dim=1).repeat_interleave(K)
        torch.testing.assert_close(output["advantages"], expected)

    # The loss applies f(w) = w / (w + 0.1) to replayed rows and the unclipped ratio to fresh rows, and only so.
    record = next(r for r in replay_records if r["output"]["advantages"][r["output"]["replay_mask"]].abs().sum() > 0)
    inputs = dict(record["output"])
    inputs["collect_mask"] = torch.zeros_like(inputs["collect_mask"])
    model.train()
    loss = trainer._compute_loss(model, inputs)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, inputs["completion_ids"].size(1)
    )
    advantages = inputs["advantages"].unsqueeze(1)
    replayed = inputs["replay_mask"].unsqueeze(1)
    shaped = torch.sigmoid(logps - inputs["stored_per_token_logps"] - math.log(0.1))
    fresh = torch.exp(logps - logps.detach())
    mask = inputs["completion_mask"]
    normaliser = 16 * 8 * trainer.current_gradient_accumulation_steps  # dr_grpo: B * max_completion_length, / GA
    expected = (torch.where(replayed, -shaped * advantages, -fresh * advantages) * mask).sum() / normaliser
    torch.testing.assert_close(loss, expected)
    unshaped = (-fresh * advantages * mask).sum() / normaliser
    assert (loss - unshaped).abs() > 1e-4  # the check above would catch a missing or misplaced shaping


def scheduled_reward(completion_ids, trainer_state, **kwargs):
    """Exactly `CORRECT[step]` correct rows out of 20, spread so that no group of 4 is fully correct."""
    correct = {0: 4, 1: 7, 2: 8}.get(trainer_state.global_step, 8)
    order = sorted(range(len(completion_ids)), key=lambda i: (i % 4, i // 4))
    rewards = [0.0] * len(completion_ids)
    for i in order[:correct]:
        rewards[i] = 1.0
    return rewards


class BufferSizes(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.sizes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):  # after the trainer's own merge callback
        self.sizes.append(self.trainer.replay_buffer.num_trajectories)


def test_delayed_start_switches_above_the_threshold_and_not_before(tiny_model_path, tmp_path):
    # 20 rows (5 groups) per generation; accuracy 4/20, 7/20 (= 0.35, not above), 8/20, 8/20.
    args = make_config(tmp_path, per_device_train_batch_size=10, delayed_start_threshold=0.35)
    trainer = RecordingTrainer(tiny_model_path, scheduled_reward, args=args, train_dataset=questions())
    sizes = BufferSizes(trainer)
    trainer.add_callback(sizes)
    trainer.train()

    assert [r["replay_started"] for r in trainer.records] == [False, False, True, True]
    assert [r["output"]["replay_mask"].sum().item() for r in trainer.records][:3] == [0, 0, 0]
    assert trainer.records[3]["output"]["replay_mask"].sum().item() == 2  # floor(0.5 * 5) from the next batch on
    assert [r["output"]["collect_mask"].sum().item() for r in trainer.records][:3] == [0, 0, 8]
    assert sizes.sizes[:2] == [0, 0] and sizes.sizes[2] > 0  # collection starts with the triggering batch
    assert trainer.replay_buffer.num_questions > 0


def test_retired_questions_leave_the_sampler_and_the_buffer(tiny_model_path, tmp_path):
    def solved_q00(completions, qid, **kwargs):  # q00 is solved by every completion, the others never
        return [1.0 if q == "q00" else 0.0 for q in qid]

    dataset = questions(8)
    args = make_config(
        tmp_path,
        per_device_train_batch_size=4,  # 8 rows, 2 groups per generation: an epoch is 4 steps
        max_steps=8,
        question_id_column="qid",
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=4,
    )
    trainer = RecordingTrainer(tiny_model_path, solved_q00, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert set(trainer._question_index) == {f"q0{b}" for b in range(4)} | {f"q1{b}" for b in range(4)}
    trainer.train()

    groups = [q for r in trainer.records for q in r["output"]["question_ids"][::4]]
    assert len(groups) == 16
    assert groups[:8].count("q00") == 1 and sorted(groups[:8]) == sorted(trainer._question_index)  # epoch 1: all
    assert groups.count("q00") == 1  # epoch 2 would have it again without retirement
    assert trainer.replay_buffer.is_retired("q00") and trainer.replay_buffer.num_retired == 1
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def replay_run(model_path, output_dir, resume_from=None):
    args = make_config(
        output_dir, max_steps=6, save_strategy="steps", save_steps=3, delayed_start_threshold=0.0, replay_ratio=0.75
    )
    trainer = RecordingTrainer(model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny_model_path, tmp_path):
    full = replay_run(tiny_model_path, tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / REPLAY_STATE_NAME, weights_only=True)
    assert saved["buffer"]["replay_started"] and saved["buffer"]["trajectory_length"].numel() > 0
    assert "2510.02245" in (tmp_path / "full" / "README.md").read_text()  # the model card cites ExGRPO

    resumed = replay_run(tiny_model_path, tmp_path / "resumed", resume_from=str(checkpoint))
    assert len(resumed.records) == 3
    replayed_after = 0
    for a, b in zip(full.records[3:], resumed.records, strict=True):
        assert a["output"]["question_ids"] == b["output"]["question_ids"]
        assert torch.equal(a["output"]["replay_mask"], b["output"]["replay_mask"])
        assert torch.equal(a["output"]["completion_ids"], b["output"]["completion_ids"])
        assert torch.equal(a["output"]["stored_per_token_logps"], b["output"]["stored_per_token_logps"])
        replayed_after += a["output"]["replay_mask"].sum().item()
    assert replayed_after > 0

    state_a, state_b = full.replay_buffer.state_dict(), resumed.replay_buffer.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if isinstance(state_a[key], torch.Tensor):
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            assert state_a[key] == state_b[key], key
    assert full._replay_rng.getstate() == resumed._replay_rng.getstate()
    weights_b = resumed.model.state_dict()
    for name, weight in full.model.state_dict().items():
        assert torch.equal(weight, weights_b[name]), name


def test_question_ids_hash_the_prompt_by_default(tiny_model_path, tmp_path):
    dataset = questions(4)
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=make_config(tmp_path), train_dataset=dataset)
    assert list(trainer._question_index) == [prompt_question_id(p) for p in dataset["prompt"]]
    assert prompt_question_id([{"content": "0+0=", "role": "user"}]) == prompt_question_id(dataset["prompt"][0][:1])
    assert prompt_question_id("a") != prompt_question_id("b")


def test_missing_question_ids_fall_back_to_the_prompt_hash(tiny_model_path, tmp_path, caplog):
    # Half the rows have no id, every prompt differs: str(None) would make those rows one question "None", replayed
    # under another row's prompt and retired by any one of them being solved.
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{a}="}], "qid": None if a % 2 else f"q{a}"} for a in range(8)
    ]
    rows[3]["qid"] = " "
    dataset = Dataset.from_list(rows)
    args = make_config(tmp_path, question_id_column="qid")
    with caplog.at_level("WARNING"):
        trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=dataset)
    assert "question_id_column='qid' has no value" in caplog.text and "4 of 8 rows" in caplog.text
    assert "(rows 1, 3, 5, 7)" in caplog.text
    expected = [f"q{a}" if a % 2 == 0 else prompt_question_id(rows[a]["prompt"]) for a in range(8)]
    assert trainer._dataset_question_ids == expected and len(set(expected)) == 8
    assert [trainer._row_question_id(row) for row in dataset] == expected
    # a float column (from pandas, say) marks a missing value with NaN
    assert trainer._row_question_id({**rows[1], "qid": float("nan")}) == expected[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": [len]}, "does not support `tools`"),
        ({"rollout_func": lambda prompts, trainer: {}}, "does not support `rollout_func`"),
        ({"environment_factory": object}, "does not support `environment_factory`"),
        # GRPOTrainer's wording, which TRL's test_dataset_required_without_environment matches
        ({"train_dataset": None}, "`train_dataset` is required"),
        ({"train_dataset": [{"prompt": "1+1="}]}, "needs a train_dataset that is a `datasets.Dataset`"),
    ],
)
def test_unsupported_setups_fail_at_construction(tiny_model_path, tmp_path, kwargs, message):
    kwargs = {"train_dataset": questions(), **kwargs}
    with pytest.raises(ValueError, match=message):
        ExGRPOTrainer(tiny_model_path, parity_reward, args=make_config(tmp_path), **kwargs)


def test_missing_question_id_column_and_wrong_config_type_fail(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="question_id_column='id' is not a column"):
        ExGRPOTrainer(
            tiny_model_path,
            parity_reward,
            args=make_config(tmp_path, question_id_column="id"),
            train_dataset=questions(),
        )
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="needs an ExGRPOConfig"):
        ExGRPOTrainer(
            tiny_model_path,
            parity_reward,
            args=GRPOConfig(str(tmp_path), use_cpu=True, bf16=False),
            train_dataset=questions(),
        )


def test_non_checkpoint_folder_warns_and_keeps_an_empty_buffer(tiny_model_path, tmp_path):
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=make_config(tmp_path), train_dataset=questions())
    os.makedirs(tmp_path / "ckpt")
    trainer._load_optimizer_and_scheduler(None)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer._load_optimizer_and_scheduler(str(tmp_path / "ckpt"))  # no optimizer file either: nothing loaded
    assert trainer.replay_buffer.num_trajectories == 0 and not trainer.replay_buffer.replay_started


class FakeVLLMGeneration:
    """Stands in for TRL's vLLM backend: random completions, each token with a made-up sampling log-prob of -5.5."""

    def __init__(self, max_length, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.max_length = max_length

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler):
        completion_ids = []
        for _ in prompts:
            length = int(torch.randint(1, self.max_length + 1, (1,), generator=self.generator))
            completion_ids.append(torch.randint(3, 259, (length,), generator=self.generator).tolist())
        return None, completion_ids, [[[-5.5] for _ in ids] for ids in completion_ids], None


def test_vllm_keys_replayed_rows_are_not_corrected_as_if_vllm_had_sampled_them(tiny_model_path, tmp_path):
    # Two optimizer steps per generation: the second half of a batch is trained after the policy moved, so the stored
    # log-probs must come from TRL's old_per_token_logps, not from the current policy.
    args = make_config(
        tmp_path,
        gradient_accumulation_steps=1,
        steps_per_generation=2,
        max_steps=6,
        delayed_start_threshold=0.0,
        vllm_importance_sampling_mode="token_truncate",
    )
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    # TRL's vLLM code path, with the engine replaced by the fake above
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, FakeVLLMGeneration(8), -1
    trainer.train()

    replay_records = [r for r in trainer.records if r["output"]["replay_mask"].any()]
    assert replay_records
    for record in trainer.records:
        output = record["output"]
        replayed, mask = output["replay_mask"], output["completion_mask"].bool()
        ratio = output["importance_sampling_ratio"]
        assert (ratio[replayed] == 1).all()
        assert (ratio[~replayed][mask[~replayed]] != 1).any()  # the fresh rows are corrected
        for row in replayed.nonzero().flatten().tolist():  # the stored log-probs took the sampling ones' place
            assert torch.equal(
                output["sampling_per_token_logps"][row][mask[row]], output["stored_per_token_logps"][row][mask[row]]
            )
        # collected rows store the training engine's log-probs of the sampling policy, not vLLM's
        for row in output["collect_mask"].nonzero().flatten().tolist():
            question_id, ids = output["question_ids"][row], completion(output, row)
            if trainer.replay_buffer.is_retired(question_id):
                continue
            stored = [
                t.logps
                for t in trainer.replay_buffer.trajectories(question_id)
                if torch.equal(t.token_ids.long(), ids)
            ]
            assert len(stored) == 1
            assert torch.equal(stored[0], output["old_per_token_logps"][row][mask[row]])
            assert not torch.allclose(stored[0], torch.full_like(stored[0], -5.5))

    # fresh tokens carry the vLLM ratio in the loss, replayed ones the shaped weight
    inputs = dict(replay_records[-1]["output"])
    inputs["collect_mask"] = torch.zeros_like(inputs["collect_mask"])
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, inputs["completion_ids"].size(1)
    )
    advantages = inputs["advantages"].unsqueeze(1)
    shaped = torch.sigmoid(logps - inputs["stored_per_token_logps"] - math.log(0.1))
    fresh = torch.exp(logps - inputs["old_per_token_logps"]) * inputs["importance_sampling_ratio"]
    per_token = torch.where(inputs["replay_mask"].unsqueeze(1), -shaped * advantages, -fresh * advantages)
    expected = (per_token * inputs["completion_mask"]).sum() / (16 * 8 * trainer.current_gradient_accumulation_steps)
    torch.testing.assert_close(loss, expected)


def test_random_selection_caps_and_dapo_aggregation(tiny_model_path, tmp_path):
    args = make_config(
        tmp_path,
        delayed_start_threshold=0.0,
        trajectory_selection="random",
        max_buffer_trajectories=5,
        max_trajectories_per_question=2,
        loss_type="dapo",
    )
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    sizes = BufferSizes(trainer)
    trainer.add_callback(sizes)
    trainer.train()

    assert max(sizes.sizes) == 5  # the cap was reached and held
    replay_records = [r for r in trainer.records if r["output"]["replay_mask"].any()]
    assert replay_records
    for record in replay_records:
        output = record["output"]
        for row in output["replay_mask"].nonzero().flatten().tolist():
            ids = completion(output, row).tolist()
            assert ids in [t for t, _ in record["buffer"][output["question_ids"][row]]]
    assert not any("replay/entropy_scoring_time" in entry for entry in trainer.state.log_history)

    # dapo: token sum over TRL's normaliser (the generation batch's tokens, rescaled to one accumulation window)
    inputs = dict(replay_records[-1]["output"])
    inputs["collect_mask"] = torch.zeros_like(inputs["collect_mask"])
    loss = trainer._compute_loss(trainer.model, inputs)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, inputs["completion_ids"].size(1)
    )
    advantages = inputs["advantages"].unsqueeze(1)
    shaped = torch.sigmoid(logps - inputs["stored_per_token_logps"] - math.log(0.1))
    per_token = torch.where(inputs["replay_mask"].unsqueeze(1), -shaped * advantages, -advantages)
    normaliser = inputs["num_items_in_batch"] * trainer.current_gradient_accumulation_steps / 2  # steps_per_generation
    torch.testing.assert_close(loss, (per_token * inputs["completion_mask"]).sum() / normaliser)


# -- any dataset TRL accepts: replays come from the rows stored in the buffer ---------------------------------------


def test_iterable_dataset_trains_and_replays_from_stored_rows(tiny_model_path, tmp_path):
    dataset = questions().to_iterable_dataset()
    args = make_config(tmp_path, delayed_start_threshold=0.0, question_id_column="qid")
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=dataset)
    assert trainer._dataset_question_ids is None  # an iterable dataset is never indexed
    trainer.train()
    replayed = [r for r in trainer.records if r["output"]["replay_mask"].any()]
    assert replayed, "replay never happened"
    for record in replayed:
        output = record["output"]
        for row in output["replay_mask"].nonzero().flatten().tolist():
            # the replayed group's prompt is the stored row's prompt: question "qAB" asks "A+B="
            question_id = output["question_ids"][row]
            prompt = trainer.processing_class.decode(output["prompt_ids"][row][output["prompt_mask"][row].bool()])
            assert f"{question_id[1]}+{question_id[2]}=" in prompt


# -- displaced fresh questions: dropped (paper) or requeued (departure) --------------------------------------------


class PlanRecorder(ExGRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled, self.fresh, self.replayed = [], [], []

    def _plan_generation(self, inputs):
        K = self.num_generations
        self.sampled += [self._row_question_id(inputs[g]) for g in range(0, len(inputs), K)]
        inputs, plan = super()._plan_generation(inputs)
        replayed = set(plan.replayed_slots)
        self.fresh += [q for slot, q in enumerate(plan.group_question_ids) if slot not in replayed]
        self.replayed += [q for slot, q in enumerate(plan.group_question_ids) if slot in replayed]
        return inputs, plan


@pytest.mark.parametrize("displaced", ["drop", "requeue"])
def test_displaced_questions_are_dropped_or_requeued(tiny_model_path, tmp_path, displaced):
    args = make_config(
        tmp_path,
        max_steps=6,
        delayed_start_threshold=0.0,
        question_id_column="qid",
        retire_solved_questions=False,
        displaced_questions=displaced,
    )
    trainer = PlanRecorder(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    assert trainer.replayed, "replay never happened"
    if displaced == "requeue":
        # the fresh stream is the sampler's stream, delayed by the replays: nothing is skipped
        assert trainer.fresh == trainer.sampled[: len(trainer.fresh)]
        assert len(trainer._requeued) == len(trainer.sampled) - len(trainer.fresh)
    else:
        # each replay displaced one sampled question, which is never trained in that step
        assert len(trainer.fresh) == len(trainer.sampled) - len(trainer.replayed)
        assert trainer.fresh != trainer.sampled[: len(trainer.fresh)]
        assert not trainer._requeued


# -- what replay does, in the logs -------------------------------------------------------------------------------


def test_replay_metrics_and_completion_column(tiny_model_path, tmp_path):
    args = make_config(tmp_path, delayed_start_threshold=0.0, question_id_column="qid", log_completions=True)
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    history = trainer.state.log_history
    last = [entry for entry in history if "replay/distinct_replayed_questions" in entry][-1]
    for k in range(1, 4):
        assert f"replay/bucket_{k}_questions" in last
    assert last["replay/distinct_replayed_questions"] == len(trainer._replay_counts) > 0
    assert last["replay/max_replays_per_question"] == max(trainer._replay_counts.values())
    assert any("replay/replayed_reward_mean" in entry for entry in history)
    shares = [entry["replay/loss_share"] for entry in history if "replay/loss_share" in entry]
    assert shares and all(0.0 <= s <= 1.0 for s in shares) and max(shares) > 0
    replayed_column = trainer._logs["extra"]["replayed"]
    assert len(replayed_column) == len(trainer._logs["prompt"]) and any(replayed_column)
    # the column marks exactly the replayed rows of the last generation batch
    last_mask = trainer.records[-1]["output"]["replay_mask"].tolist()
    assert list(replayed_column)[-len(last_mask) :] == last_mask


def test_no_replay_buffers_nothing(tiny_model_path, tmp_path):
    args = make_config(
        tmp_path, replay_ratio=0.0, delayed_start_threshold=0.0, max_steps=4, save_strategy="steps", save_steps=4
    )
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    buffer = trainer.replay_buffer
    assert buffer.replay_started  # the phase still switches (it lifts fresh clipping)
    assert buffer.num_trajectories == 0 and buffer.num_questions == 0 and not trainer._pending_trajectories
    assert not any(record["output"]["collect_mask"].any() for record in trainer.records)
    saved = torch.load(tmp_path / "checkpoint-4" / REPLAY_STATE_NAME, weights_only=True)["buffer"]
    assert saved["question_ids"] == [] and saved["rows"] == [] and saved["token_ids"].numel() == 0
    assert saved["replay_started"] and saved["retired"] == sorted(buffer._retired) != []  # retirement still acts
    logged = set().union(*trainer.state.log_history)
    assert {"replay/phase", "replay/accuracy", "replay/retired_questions", "replay/distinct_fresh_questions"} <= logged
    assert not {
        k for k in logged if k.startswith(("replay/buffer", "replay/bucket", "replay/replayed", "replay/loss"))
    }


def test_entropy_bonus_logs_policy_loss_and_coefficient(tiny_model_path, tmp_path):
    args = make_config(tmp_path, max_steps=2, entropy_coef=0.01)
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "policy_loss" in entry]
    assert len(logged) == 2 and all(entry["entropy_coef"] == pytest.approx(0.01) for entry in logged)


def test_infinite_rewards_are_unscorable_and_not_trained_on(tiny_model_path, tmp_path):
    def sometimes_infinite(completion_ids, **kwargs):  # +inf and -inf, each on one completion in eight
        inf = [float("inf"), float("-inf")]
        return [inf[i % 8 // 4] if i % 4 == 0 else float(sum(ids) % 2 == 0) for i, ids in enumerate(completion_ids)]

    args = make_config(tmp_path, max_steps=3, delayed_start_threshold=0.0, scale_rewards="none")
    trainer = RecordingTrainer(tiny_model_path, sometimes_infinite, args=args, train_dataset=questions())
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    output = trainer.records[0]["output"]
    assert output["scorable"].tolist() == [i % 4 != 0 for i in range(16)]
    assert [e["rewards/non_finite"] for e in trainer.state.log_history if "rewards/non_finite" in e][0] == 0.25


# -- checkpoints ------------------------------------------------------------------------------------------------


def test_replay_state_is_in_the_checkpoint_before_it_is_pushed(tiny_model_path, tmp_path):
    args = make_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    seen = []
    trainer.args.push_to_hub = True  # after construction: no hub repository is created
    trainer._push_from_checkpoint = lambda folder: seen.append(sorted(os.listdir(folder)))
    trainer.train()
    assert len(seen) == 2 and all(REPLAY_STATE_NAME in names for names in seen)
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not [name for name in os.listdir(tmp_path / "checkpoint-2") if name.endswith(".tmp")]


@pytest.fixture(scope="module")
def exgrpo_checkpoint(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("exgrpo-run")
    args = make_config(
        out, max_steps=3, save_strategy="steps", save_steps=3, delayed_start_threshold=0.0, question_id_column="qid"
    )
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    assert trainer.replay_buffer.num_trajectories > 0
    return out / "checkpoint-3"


def resume(model_path, output_dir, checkpoint, dataset=None, **kwargs):
    kwargs = {"max_steps": 4, "delayed_start_threshold": 0.0, "question_id_column": "qid", **kwargs}
    trainer = ExGRPOTrainer(
        model_path, parity_reward, args=make_config(output_dir, **kwargs), train_dataset=dataset or questions()
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_resume_refuses_missing_corrupt_or_foreign_replay_state(tiny_model_path, tmp_path, exgrpo_checkpoint):
    import shutil

    missing = shutil.copytree(exgrpo_checkpoint, tmp_path / "missing" / "checkpoint-3")
    os.remove(os.path.join(missing, REPLAY_STATE_NAME))
    with pytest.raises(FileNotFoundError, match="written by ExGRPOTrainer but has no"):
        resume(tiny_model_path, tmp_path / "a", missing)

    corrupt = shutil.copytree(exgrpo_checkpoint, tmp_path / "corrupt" / "checkpoint-3")
    path = os.path.join(corrupt, REPLAY_STATE_NAME)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        resume(tiny_model_path, tmp_path / "b", corrupt)

    with pytest.raises(ValueError, match="question_id_column='qid'"):
        resume(tiny_model_path, tmp_path / "c", exgrpo_checkpoint, question_id_column=None)

    other = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{a}*{a}="}], "qid": f"x{a}"} for a in range(16)]
    )
    with pytest.raises(ValueError, match="not in this train dataset"):
        resume(tiny_model_path, tmp_path / "d", exgrpo_checkpoint, dataset=other)


def _lengthen_first_trajectory(state):
    state["buffer"]["trajectory_length"][0] += 1


def _store_a_nan_logp(state):
    state["buffer"]["logps"][0] = float("nan")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_lengthen_first_trajectory, "stored trajectory lengths add up to"),
        (lambda state: state.pop("rng"), "it has no 'rng' entry"),
        (_store_a_nan_logp, "1 stored log-probs are NaN or infinite"),
        (lambda state: state["rng"].pop("internal"), "its 'rng' entry is not the state of a random.Random"),
    ],
)
def test_resume_refuses_an_edited_replay_state_naming_the_file(
    tiny_model_path, tmp_path, exgrpo_checkpoint, edit, message
):
    import shutil

    checkpoint = shutil.copytree(exgrpo_checkpoint, tmp_path / "checkpoint-3")
    path = os.path.join(checkpoint, REPLAY_STATE_NAME)
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    args = make_config(tmp_path / "out", delayed_start_threshold=0.0, question_id_column="qid")
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    with pytest.raises(ValueError, match=re.escape(f"Cannot resume from {path}: ") + ".*" + re.escape(message)):
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert trainer.replay_buffer.num_trajectories == 0 and not trainer.replay_buffer.replay_started


def test_resume_with_a_shorter_completion_limit_drops_longer_trajectories(
    tiny_model_path, tmp_path, exgrpo_checkpoint, caplog
):
    saved = torch.load(exgrpo_checkpoint / REPLAY_STATE_NAME, weights_only=True)["buffer"]["trajectory_length"]
    limit = int(saved.min())
    assert saved.max() > limit, "the fixture should hold trajectories of several lengths"
    with caplog.at_level("WARNING"):
        trainer = resume(tiny_model_path, tmp_path, exgrpo_checkpoint, max_completion_length=limit)
    assert f"Dropped {int((saved > limit).sum())} stored trajectories" in caplog.text
    assert all(
        t.token_ids.numel() <= limit
        for q in trainer.replay_buffer.eligible_questions()
        for t in trainer.replay_buffer.trajectories(q)
    )


def test_resume_from_a_grpo_checkpoint_starts_with_an_empty_buffer(tiny_model_path, tmp_path, caplog):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    GRPOTrainer(model=tiny_model_path, reward_funcs=parity_reward, args=args, train_dataset=questions()).train()
    with caplog.at_level("WARNING"):
        trainer = resume(tiny_model_path, tmp_path / "exgrpo", tmp_path / "grpo" / "checkpoint-1", max_steps=2)
    assert "empty replay buffer" in caplog.text and trainer.state.global_step == 2


@pytest.mark.parametrize(
    "switches, expected",
    [
        # against the policy that started the step, w = 1 on the first micro-batch: f(1) = 1 / 1.1, or 1 unshaped
        ({"replay_importance_correction": False}, 1 / 1.1),
        ({"replay_importance_correction": False, "replay_policy_shaping": False}, 1.0),
    ],
)
def test_ablations_without_importance_correction_or_shaping(tiny_model_path, tmp_path, switches, expected):
    args = make_config(tmp_path, delayed_start_threshold=0.0, gradient_accumulation_steps=1, **switches)
    trainer = ExGRPOTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    weights = [e["replay/shaped_weight_mean"] for e in trainer.state.log_history if "replay/shaped_weight_mean" in e]
    assert weights and all(w == pytest.approx(expected, abs=1e-6) for w in weights)


def test_policy_shaping_off_uses_the_plain_ratio_against_the_stored_policy(tiny_model_path, tmp_path):
    args = make_config(tmp_path, delayed_start_threshold=0.0, replay_policy_shaping=False)
    trainer = RecordingTrainer(tiny_model_path, parity_reward, args=args, train_dataset=questions())
    trainer.train()
    weights = [e["replay/shaped_weight_mean"] for e in trainer.state.log_history if "replay/shaped_weight_mean" in e]
    # w = pi / pi_stored is no longer squashed below 1 / (1 + s): trajectories stored several steps ago drift from 1
    assert weights and any(abs(w - 1.0) > 1e-3 for w in weights) and all(w > 0 for w in weights)
