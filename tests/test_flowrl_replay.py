"""FlowRL's replay of past rollouts: the store on its own, the config's refusals, and the trainer end to end (which rows
are generated, what a replayed row carries into the loss, checkpoints, several processes, iterable datasets)."""

import random

import pytest
import torch
from conftest import run_distributed
from datasets import Dataset, IterableDataset

from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl.flowrl.flowrl_trainer import LOG_Z_STATE_NAME
from trl_flowrl.flowrl.replay import RolloutBuffer, weighted_sample


def ids(*values):
    return torch.tensor(values, dtype=torch.int32)


def add(buffer, prompt, completion, reward=1.0, step=0):
    tokens = ids(*completion)
    return buffer.add(prompt, ids(1, 2), tokens, -torch.ones(len(completion)), reward, step)


# -- the store ---------------------------------------------------------------------------------------------------


def test_a_completion_is_stored_once_per_prompt():
    buffer = RolloutBuffer(max_per_prompt=10, max_rows=100)
    assert add(buffer, "a", [5, 6]) and not add(buffer, "a", [5, 6], reward=0.0)
    assert add(buffer, "b", [5, 6])  # the same completion of another prompt is another row
    assert buffer.num_rows == 2 and buffer.rows("a")[0].reward == 1.0


def test_bounds_evict_the_oldest_per_prompt_and_overall():
    buffer = RolloutBuffer(max_per_prompt=2, max_rows=3)
    for token in (1, 2, 3):
        add(buffer, "a", [token], step=token)
    assert [r.step for r in buffer.rows("a")] == [2, 3]  # the newest two of "a"
    add(buffer, "b", [9], step=4)
    add(buffer, "b", [8], step=5)  # four rows: the oldest overall ("a" at step 2) goes
    assert [r.step for r in buffer.rows("a")] == [3] and [r.step for r in buffer.rows("b")] == [4, 5]
    add(buffer, "c", [7], step=6)  # "a" loses its last row and leaves the store
    assert buffer.rows("a") == [] and buffer.num_prompts == 2 and buffer.num_rows == 3


def test_groups_are_distinct_completions_of_one_eligible_prompt():
    buffer = RolloutBuffer(max_per_prompt=10, max_rows=100)
    for token in range(5):
        add(buffer, "a", [token])
    for token in range(3):
        add(buffer, "b", [token])  # fewer than a group: never replayed
    groups = buffer.draw_groups(2, 4, random.Random(0))
    assert [key for key, _, _ in groups] == ["a"]
    (_, prompt_ids, rows) = groups[0]
    assert torch.equal(prompt_ids, ids(1, 2))
    assert len({tuple(r.completion_ids.tolist()) for r in rows}) == 4
    # the same generator state draws the same groups
    again = buffer.draw_groups(2, 4, random.Random(0))
    assert [r.serial for r in again[0][2]] == [r.serial for r in rows]


def test_reward_sampling_prefers_high_rewards():
    buffer = RolloutBuffer(max_per_prompt=10, max_rows=100)
    for token, reward in enumerate([0.0, 0.0, 0.0, 1.0, 1.0]):
        add(buffer, "a", [token], reward=reward)
    rng = random.Random(0)
    for _ in range(20):  # temperature 0.01: weights e^-100 for the zeros
        (_, _, rows) = buffer.draw_groups(1, 2, rng, sampling="reward", temperature=0.01)[0]
        assert sorted(r.reward for r in rows) == [1.0, 1.0]


def test_weighted_sample_draws_in_proportion_to_the_weights():
    rng = random.Random(0)
    firsts = [weighted_sample([1.0, 3.0], 1, rng)[0] for _ in range(4000)]
    assert abs(firsts.count(1) / 4000 - 0.75) < 0.03
    assert sorted(weighted_sample([1.0, 1.0, 1.0], 3, rng)) == [0, 1, 2]


def test_state_round_trip_keeps_order_draws_and_eviction():
    buffer = RolloutBuffer(max_per_prompt=2, max_rows=6, keep_behaviour_logps=True)
    # "a" comes first, but its first row is evicted: its oldest live row is then newer than "b"'s, and the prompt
    # order (which the draws follow) must survive the round trip all the same
    additions = [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("c", 4), ("c", 5)]
    for i, (prompt, token) in enumerate(additions):
        buffer.add(prompt, ids(i), ids(token, token), torch.full((2,), -0.5 * i), float(i), i, torch.zeros(2) - i)
    restored = RolloutBuffer(max_per_prompt=2, max_rows=6, keep_behaviour_logps=True)
    restored.load_state_dict(buffer.state_dict())
    assert restored.num_rows == buffer.num_rows == 6
    for key in ("a", "b", "c"):
        a, b = buffer.rows(key), restored.rows(key)
        assert [(r.serial, r.step, r.reward) for r in a] == [(r.serial, r.step, r.reward) for r in b]
        assert all(torch.equal(x.behaviour_logps, y.behaviour_logps) for x, y in zip(a, b))
    assert restored.eligible_prompts(2) == buffer.eligible_prompts(2) == ["a", "b", "c"]
    draws = [
        [r.serial for _, _, rows in store.draw_groups(2, 2, random.Random(3)) for r in rows]
        for store in (buffer, restored)
    ]
    assert draws[0] == draws[1]
    for store in (buffer, restored):  # the next addition evicts the oldest live row, "b"'s first, from both
        store.add("d", ids(9), ids(9), torch.zeros(1), 1.0, 9, torch.zeros(1))
    serials = [[[r.serial for r in store.rows(k)] for k in "abcd"] for store in (buffer, restored)]
    assert serials[0] == serials[1] == [[3, 4], [2], [5, 6], [7]]


def test_damaged_states_are_refused():
    buffer = RolloutBuffer(max_per_prompt=4, max_rows=10)
    add(buffer, "a", [1, 2])
    state = buffer.state_dict()
    state["ref_logps"] = state["ref_logps"][:1]
    with pytest.raises(ValueError, match="one reference log-prob per completion token"):
        RolloutBuffer(4, 10).load_state_dict(state)
    with pytest.raises(ValueError, match="without the sampling policy's log-probs"):
        RolloutBuffer(4, 10, keep_behaviour_logps=True).load_state_dict(buffer.state_dict())
    add(buffer, "a", [3])
    state = buffer.state_dict()
    state["ref_logps"][0] = float("nan")
    with pytest.raises(ValueError, match="finite log-probs"):
        RolloutBuffer(4, 10).load_state_dict(state)
    state = buffer.state_dict()
    state["behaviour_logps"] = torch.zeros_like(state["ref_logps"])
    state["behaviour_logps"][-1] = float("inf")
    with pytest.raises(ValueError, match="finite log-probs"):
        RolloutBuffer(4, 10, keep_behaviour_logps=True).load_state_dict(state)
    state = buffer.state_dict()
    state["serials"][1] = state["serials"][0]
    with pytest.raises(ValueError, match="distinct serials"):
        RolloutBuffer(4, 10).load_state_dict(state)
    state = buffer.state_dict()
    state["next_serial"] = 1
    with pytest.raises(ValueError, match="below next_serial"):
        RolloutBuffer(4, 10).load_state_dict(state)
    # the same completion twice under one prompt: the second row's tokens made a copy of the first's
    state = buffer.state_dict()
    state["completion_ids"] = torch.tensor([1, 2, 1, 2], dtype=state["completion_ids"].dtype)
    state["ref_logps"] = torch.zeros(4)
    state["lengths"] = torch.tensor([2, 2], dtype=state["lengths"].dtype)
    with pytest.raises(ValueError, match="distinct completions under each prompt"):
        RolloutBuffer(4, 10).load_state_dict(state)
    RolloutBuffer(4, 10).load_state_dict(buffer.state_dict())  # the undamaged state still loads


def test_drop_longer_than():
    buffer = RolloutBuffer(max_per_prompt=4, max_rows=10)
    add(buffer, "a", [1, 2, 3])
    add(buffer, "b", [1])
    assert buffer.drop_longer_than(2) == 1 and buffer.num_rows == 1 and buffer.num_prompts == 1


# -- the config ----------------------------------------------------------------------------------------------------


def config(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        objective="matching",
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    return FlowRLConfig(**(base | kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(replay_share=1.0), r"must be\s+in \[0, 1\)"),
        (dict(replay_share=0.5, objective="official"), "fixed\\s+point does not depend on the sampler"),
        (dict(replay_share=0.5, residual_normalization="token_mean"), "residual_normalization 'sum' or 'length'"),
        (dict(replay_share=0.5, sync_ref_model=True), "sync_ref_model"),
        (dict(replay_share=0.5, replay_buffer_per_prompt=2), "at least num_generations"),
        (dict(replay_share=0.5, replay_buffer_max_rows=50), "at least replay_buffer_per_prompt"),
        (dict(replay_share=0.5, replay_sampling="newest"), "replay_sampling"),
        (dict(replay_share=0.5, replay_temperature=0.0), "replay_temperature"),
        (dict(replay_share=0.5, replay_importance_weight="full"), "replay_importance_weight"),
    ],
)
def test_invalid_replay_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)


def test_replay_is_off_by_default(tmp_path):
    assert config(tmp_path).replay_share == 0.0
    assert FlowRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).replay_share == 0.0


# -- the trainer ---------------------------------------------------------------------------------------------------


def count_digits(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


PROMPTS = [(1, 2), (3, 4), (5, 1), (2, 2)]


def prompt_rows():
    return [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a, b in PROMPTS]


class Recording(FlowRLTrainer):
    """Records the rows handed to generation and the inputs of every loss call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated, self.loss_inputs = [], []

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        self.generated.append(len(prompt_ids))
        return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return super()._compute_loss(model, inputs)


def make_trainer(model_path, output_dir, dataset=None, cls=FlowRLTrainer, **kwargs):
    args = dict(
        output_dir=str(output_dir),
        objective="matching",
        replay_share=0.5,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=0,
    )
    dataset = Dataset.from_list(prompt_rows()) if dataset is None else dataset
    return cls(
        model=model_path, reward_funcs=count_digits, args=FlowRLConfig(**(args | kwargs)), train_dataset=dataset
    )


def test_replayed_groups_are_not_generated_and_carry_their_stored_rows(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, cls=Recording)
    trainer.train()
    # 2 groups per step: the first step generates both (nothing stored yet), each later one a single group
    assert trainer.generated == [8, 4, 4, 4]
    shares = [e["flowrl/replay/share"] for e in trainer.state.log_history if "flowrl/replay/share" in e]
    assert shares == [0.0, 0.5, 0.5, 0.5]
    inputs = trainer.loss_inputs[-1]
    replayed = inputs["flowrl_replayed"].nonzero().flatten().tolist()  # TRL shuffles the rows of a batch
    assert len(replayed) == 4
    # A replayed row carries a completion the store holds for its prompt, with its stored reward and age ...
    for row in replayed:
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        stored = {tuple(r.completion_ids.tolist()): r for r in trainer.replay_buffer.rows(_digest(prompt))}
        tokens = tuple(inputs["completion_ids"][row][inputs["completion_mask"][row].bool()].tolist())
        assert tokens in stored
        # the reward is the one these very tokens earn
        text = trainer.processing_class.decode(list(tokens), skip_special_tokens=True)
        assert inputs["rewards"][row].item() == stored[tokens].reward == count_digits([[{"content": text}]])[0]
        assert inputs["flowrl_replay_age"][row].item() == trainer.state.global_step - 1 - stored[tokens].step
    # ... and reference log-probs that the reference model gives it now, padding included (left prompt, right
    # completion): the stored ones are aligned with the replayed tokens.
    with torch.no_grad():
        ref, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            inputs["completion_ids"].size(1),
        )
    mask = inputs["completion_mask"].bool()
    torch.testing.assert_close(ref[mask], inputs["ref_per_token_logps"][mask], atol=1e-5, rtol=1e-5)


def _digest(prompt_ids):
    from trl_flowrl.flowrl.replay import token_digest

    return token_digest(prompt_ids)


def test_clipped_weight_uses_the_stored_sampling_log_probs(tiny_model_path, tmp_path):
    weights = {}
    for mode in ("none", "clipped"):
        trainer = make_trainer(
            tiny_model_path,
            tmp_path / mode,
            cls=Recording,
            replay_importance_weight=mode,
            learning_rate=3e-2,
            max_steps=4,
        )
        trainer.train()
        weights[mode] = [e["flowrl/importance_weight/mean"] for e in trainer.state.log_history[1:4]]
    assert weights["none"] == [1.0, 1.0, 1.0]  # each batch is used once: every weight is 1
    assert all(w != 1.0 for w in weights["clipped"])  # the replayed rows were sampled by earlier policies
    # What weighs a replayed row is the log-probs stored with its tokens (those of the policy that sampled it)
    inputs = trainer.loss_inputs[-1]
    for row in inputs["flowrl_replayed"].nonzero().flatten().tolist():
        mask = inputs["completion_mask"][row].bool()
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        tokens = inputs["completion_ids"][row][mask]
        (stored,) = [
            r for r in trainer.replay_buffer.rows(_digest(prompt)) if torch.equal(r.completion_ids.long(), tokens)
        ]
        torch.testing.assert_close(inputs["flowrl_behaviour_logps"][row][mask], stored.behaviour_logps)
        assert stored.step < trainer.state.global_step - 1  # written at an earlier step than this one


def test_several_steps_per_generation_give_replayed_rows_the_current_log_probs(tiny_model_path, tmp_path):
    """With two optimizer steps per generation TRL keeps the generating policy's log-probs for the weight and for the
    group estimate of log Z: a replayed row gets the current policy's, computed when it is replayed."""

    class Checking(Recording):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if "flowrl_replayed" in output:
                replayed = output["flowrl_replayed"]
                expected = self._policy_logps(
                    {
                        k: output[k][replayed]
                        for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
                    }
                )
                mask = output["completion_mask"][replayed].bool()
                torch.testing.assert_close(output["old_per_token_logps"][replayed][mask], expected[mask])
                self.checked = getattr(self, "checked", 0) + 1
            return output

    trainer = make_trainer(tiny_model_path, tmp_path, cls=Checking, steps_per_generation=2, max_steps=6)
    trainer.train()
    assert trainer.checked >= 2 and all(torch.isfinite(i["flowrl_log_z"]).all() for i in trainer.loss_inputs)


def test_one_group_per_process_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least two groups"):
        config(tmp_path, replay_share=0.5, per_device_train_batch_size=4)


def test_replay_resume_reproduces_an_uninterrupted_run(tiny_model_path, tmp_path):
    # Resumed at an epoch boundary (4 prompts, 2 per step): mid-epoch, TRL's own resume of the sampling is not exact
    # on these settings, with or without replay.
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, replay_sampling="reward")
    full = make_trainer(tiny_model_path, tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    state = torch.load(checkpoint / LOG_Z_STATE_NAME, weights_only=True)
    assert state["replay"]["buffer"]["lengths"].numel() > 0
    resumed = make_trainer(tiny_model_path, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"policy parameter {name} differs"
    a, b = full.replay_buffer.state_dict(), resumed.replay_buffer.state_dict()
    assert a["prompt_keys"] == b["prompt_keys"]
    for key in ("completion_ids", "rewards", "steps", "serials"):
        assert torch.equal(a[key], b[key]), key
    assert full._replay_rng.getstate() == resumed._replay_rng.getstate()


def test_resume_without_a_stored_buffer_starts_empty(tiny_model_path, tmp_path, caplog):
    common = dict(max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model_path, tmp_path / "plain", replay_share=0.0, **common).train()
    resumed = make_trainer(tiny_model_path, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))
    assert "holds no replay buffer" in caplog.text


def test_replay_works_with_an_iterable_dataset(tiny_model_path, tmp_path):
    def rows():
        while True:
            yield from prompt_rows()

    trainer = make_trainer(tiny_model_path, tmp_path, dataset=IterableDataset.from_generator(rows), cls=Recording)
    trainer.train()
    assert trainer.generated == [8, 4, 4, 4] and trainer.replay_buffer.num_rows > 0


def test_replay_refuses_tools(tiny_model_path, tmp_path):
    def add_numbers(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first number.
            b: the second number.
        """
        return a + b

    with pytest.raises(ValueError, match="does not support `tools`"):
        FlowRLTrainer(
            model=tiny_model_path,
            reward_funcs=count_digits,
            args=config(tmp_path, replay_share=0.5),
            train_dataset=Dataset.from_list(prompt_rows()),
            tools=[add_numbers],
        )


DDP_SCRIPT = """
import json, sys
import torch
from datasets import Dataset
from trl_flowrl import FlowRLConfig, FlowRLTrainer

model_path, out = sys.argv[1], sys.argv[2]


def count_digits(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)])
args = FlowRLConfig(
    output_dir=out, objective="matching", replay_share=0.5, replay_sampling="reward", per_device_train_batch_size=8,
    num_generations=4, max_completion_length=8, max_steps=4, learning_rate=1e-2, logging_steps=1, save_strategy="no",
    use_cpu=True, bf16=False, report_to="none",
)
trainer = FlowRLTrainer(model=model_path, reward_funcs=count_digits, args=args, train_dataset=dataset)
trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {
        "buffer": trainer.replay_buffer.state_dict(),
        "rng": trainer._replay_rng.getstate(),
        "policy": trainer.accelerator.unwrap_model(trainer.model).state_dict(),
        "shares": [e["flowrl/replay/share"] for e in trainer.state.log_history if "flowrl/replay/share" in e],
    },
    f"{out}/rank{rank}.pt",
)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_every_process_holds_the_same_store(tiny_model_path, tmp_path):
    script = tmp_path / "ddp_replay.py"
    script.write_text(DDP_SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    a, b = states[0]["buffer"], states[1]["buffer"]
    assert a["prompt_keys"] == b["prompt_keys"] and len(a["prompt_keys"]) > 2
    for key in ("completion_ids", "ref_logps", "rewards", "steps", "serials"):
        assert torch.equal(a[key], b[key]), key
    assert states[0]["rng"] == states[1]["rng"]
    # both processes generated two groups per step each (16 rows) at first, then replayed one group each
    assert states[0]["shares"] == states[1]["shares"] and states[0]["shares"][1:] == [0.5, 0.5, 0.5]
    for name, tensor in states[0]["policy"].items():
        assert torch.equal(tensor, states[1]["policy"][name]), name
