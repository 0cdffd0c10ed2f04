"""Two processes (DDP on CPU, gloo) hold identical replay buffers and draw identical plans."""

import textwrap

import pytest
import torch
from conftest import needs_transformers_5_18, run_distributed


pytestmark = pytest.mark.multiprocess

SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from datasets import Dataset

    from trl_flowrl.exgrpo import ExGRPOConfig, ExGRPOTrainer

    model_path, output_dir = sys.argv[1], sys.argv[2]


    def parity_reward(completion_ids, **kwargs):
        return [float(sum(ids) % 2 == 0) for ids in completion_ids]


    class Recording(ExGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.plans, self.scoring_batches = [], []

        def _plan_generation(self, inputs):
            inputs, plan = super()._plan_generation(inputs)
            self.plans.append({"groups": plan.group_question_ids, "local_replays": len(plan.substitutions)})
            return inputs, plan

        def _score_trajectories(self, candidates, num_batches):
            self.scoring_batches.append((num_batches, sum(len(t) for _, t in candidates)))
            return super()._score_trajectories(candidates, num_batches)


    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    )
    args = ExGRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # 8 rows (2 groups) per process, 4 groups per generation
        num_generations=4,
        max_completion_length=8,
        max_steps=5,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        delayed_start_threshold=0.0,
    )
    trainer = Recording(model_path, parity_reward, args=args, train_dataset=dataset)
    trainer._collective_forward = True  # exercise the equal-count scoring of FSDP / ZeRO-3 (harmless under DDP)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "buffer": trainer.replay_buffer.state_dict(),
            "rng": repr(trainer._replay_rng.getstate()),
            "plans": trainer.plans,
            "scoring_batches": trainer.scoring_batches,
        },
        f"{output_dir}/rank{rank}.pt",
    )
    trainer.accelerator.end_training()
    """
)


def test_two_processes_hold_identical_buffers(tiny_model_path, tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    assert rank0["buffer"]["replay_started"] and rank0["buffer"]["trajectory_length"].numel() > 0
    for key, value in rank0["buffer"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, rank1["buffer"][key]), key
        else:
            assert value == rank1["buffer"][key], key
    assert rank0["rng"] == rank1["rng"]

    # The same global plan everywhere, and every process replays its share: floor(0.5 * 4 groups) = 2, one each.
    assert [p["groups"] for p in rank0["plans"]] == [p["groups"] for p in rank1["plans"]]
    assert len(rank0["plans"]) == 5
    local0 = [p["local_replays"] for p in rank0["plans"]]
    local1 = [p["local_replays"] for p in rank1["plans"]]
    assert local0[0] == local1[0] == 0 and sum(local0[1:]) > 0
    assert local0 == local1

    # Scoring ran the same number of forward passes on both processes, enough for each one's candidates.
    batches0, batches1 = rank0["scoring_batches"], rank1["scoring_batches"]
    assert [n for n, _ in batches0] == [n for n, _ in batches1]
    for (n, c0), (_, c1) in zip(batches0, batches1):
        assert n * 4 >= max(c0, c1)


RESUME_SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    import torch
    from datasets import Dataset

    import trl_flowrl.exgrpo.exgrpo_trainer as exgrpo_trainer
    from trl_flowrl.exgrpo import ExGRPOConfig, ExGRPOTrainer

    model_path, output_dir = sys.argv[1], sys.argv[2]


    def parity_reward(completion_ids, **kwargs):
        return [float(sum(ids) % 2 == 0) for ids in completion_ids]


    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    )


    def config(max_steps):
        return ExGRPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
            gradient_accumulation_steps=2, num_generations=4, max_completion_length=8, max_steps=max_steps,
            learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=3, seed=0, disable_tqdm=True,
            delayed_start_threshold=0.0,
        )


    first = ExGRPOTrainer(model_path, parity_reward, args=config(3), train_dataset=dataset)
    first.train()
    saved = first.replay_buffer.state_dict()

    # Only the main process may look at the replay state (the others behave as if it lived on another machine's disk:
    # the file is neither there nor readable).
    rank = first.accelerator.process_index
    original_load, original_isfile = torch.load, os.path.isfile

    def load(path, *args, **kwargs):
        if rank != 0 and str(path).endswith(exgrpo_trainer.REPLAY_STATE_NAME):
            raise FileNotFoundError(path)
        return original_load(path, *args, **kwargs)

    def isfile(path):
        return original_isfile(path) and not (rank != 0 and str(path).endswith(exgrpo_trainer.REPLAY_STATE_NAME))

    torch.load, os.path.isfile = load, isfile
    resumed = ExGRPOTrainer(model_path, parity_reward, args=config(3), train_dataset=dataset)
    resumed.create_optimizer_and_scheduler(num_training_steps=3)
    resumed._load_optimizer_and_scheduler(f"{output_dir}/checkpoint-3")
    torch.load, os.path.isfile = original_load, original_isfile
    torch.save({"saved": saved, "resumed": resumed.replay_buffer.state_dict()}, f"{output_dir}/resume{rank}.pt")
    resumed.accelerator.end_training()
    """
)


@needs_transformers_5_18
def test_resume_reads_the_replay_state_once_and_broadcasts_it(tiny_model_path, tmp_path):
    script = tmp_path / "resume_ddp.py"
    script.write_text(RESUME_SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))
    states = [torch.load(tmp_path / f"resume{rank}.pt", weights_only=False) for rank in range(2)]
    assert states[0]["saved"]["trajectory_length"].numel() > 0
    for state in states:
        for key, value in state["saved"].items():
            restored = state["resumed"][key]
            assert torch.equal(value, restored) if isinstance(value, torch.Tensor) else value == restored, key


UNEVEN_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from datasets import Dataset

    from trl_flowrl.exgrpo import ExGRPOConfig, ExGRPOTrainer

    model_path, output_dir = sys.argv[1], sys.argv[2]


    def parity_reward(completion_ids, **kwargs):
        return [float(sum(ids) % 2 == 0) for ids in completion_ids]


    class Recording(ExGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.local_replays, self.chosen_entropies = [], []

        def _plan_generation(self, inputs):
            inputs, plan = super()._plan_generation(inputs)
            self.local_replays.append(len(plan.substitutions))
            self.chosen_entropies.append(list(plan.chosen_entropies))
            return inputs, plan

        def log(self, logs, start_time=None):
            self.logged = getattr(self, "logged", []) + [dict(self._metrics["train"])]
            super().log(logs, start_time)


    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)])
    args = ExGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        num_generations=4,  # one group per process, two per generation: floor(0.5 * 2) = 1 replayed, on rank 0 only
        max_completion_length=8, max_steps=4, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
        disable_tqdm=True, delayed_start_threshold=0.0, beta=0.04,
    )
    trainer = Recording(model_path, parity_reward, args=args, train_dataset=dataset)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "local_replays": trainer.local_replays,
            "chosen_entropies": trainer.chosen_entropies,
            "logged": [{k: list(v) for k, v in m.items()} for m in trainer.logged],
        },
        f"{output_dir}/uneven{rank}.pt",
    )
    trainer.accelerator.end_training()
    """
)


def test_uneven_replay_across_processes(tiny_model_path, tmp_path):
    """One group per process and replay_ratio 0.5: a replaying step replays one group, always on rank 0, so rank 1
    scores no trajectory; every collective (the chosen-entropy reduce included) must still match across ranks."""
    script = tmp_path / "uneven_ddp.py"
    script.write_text(UNEVEN_SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"uneven{rank}.pt", weights_only=False) for rank in range(2))

    steps = [s for s, (r0, r1) in enumerate(zip(rank0["local_replays"], rank1["local_replays"])) if (r0, r1) == (1, 0)]
    assert steps, (rank0["local_replays"], rank1["local_replays"])
    assert all(r1 == 0 for r1 in rank1["local_replays"])
    for step in steps:
        # The logged chosen entropy is rank 0's only, not diluted by rank 1's empty list.
        (chosen,) = rank0["chosen_entropies"][step]
        assert rank1["chosen_entropies"][step] == []
        assert rank0["logged"][step]["replay/chosen_entropy"] == pytest.approx([chosen], rel=1e-5)
        assert rank1["logged"][step]["replay/chosen_entropy"] == pytest.approx([chosen], rel=1e-5)
