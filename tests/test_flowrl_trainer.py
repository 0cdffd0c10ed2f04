"""FlowRLTrainer end to end on the tiny local model: training, the log Z head, checkpoints, PEFT, metrics."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import needs_transformers_5_18, run_distributed
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl.flowrl.flowrl_trainer import LOG_Z_STATE_NAME, saved_config_class
from trl_flowrl.flowrl.objective import trajectory_balance_terms


def count_digits(completions, **kwargs):
    """A deterministic reward that a random tiny model earns now and then (about a quarter of its completions)."""
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def make_trainer(model_path, output_dir, dataset, reward=count_digits, **config_kwargs):
    config = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=0,
    )
    config.update(config_kwargs)
    return FlowRLTrainer(model=model_path, reward_funcs=reward, args=FlowRLConfig(**config), train_dataset=dataset)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


GRPO_SCRIPT = """
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer


def reward_digits(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c[0]["content"])) for c in completions]


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)])
args = GRPOConfig(
    output_dir=OUTPUT_DIR, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2,
    logging_steps=1, use_cpu=True, bf16=False, report_to="none",
)
trainer = GRPOTrainer(model=MODEL_PATH, reward_funcs=reward_digits, args=args, train_dataset=dataset)
trainer.train()
"""


def test_grpo_script_runs_with_only_the_class_names_changed(tiny_model_path, tmp_path):
    flowrl_script = (
        GRPO_SCRIPT.replace("from trl import", "from trl_flowrl import")
        .replace("GRPOConfig", "FlowRLConfig")
        .replace("GRPOTrainer", "FlowRLTrainer")
    )
    for name, script in [("grpo", GRPO_SCRIPT), ("flowrl", flowrl_script)]:
        namespace = {"MODEL_PATH": tiny_model_path, "OUTPUT_DIR": str(tmp_path / name)}
        exec(compile(script, f"<{name} script>", "exec"), namespace)
        assert namespace["trainer"].state.global_step == 2
    trainer = namespace["trainer"]
    assert isinstance(trainer, FlowRLTrainer)
    for key in [
        "flowrl/log_z/mean",
        "flowrl/log_z/std",
        "flowrl/residual/mean",
        "flowrl/residual/abs_mean",
        "flowrl/importance_weight/mean",
        "flowrl/importance_weight/max",
        "flowrl/importance_weight/clip_fraction",
        "flowrl/logp_gap/mean",
    ]:
        assert len(logged(trainer, key)) == 2, key
    assert "kl" not in trainer.state.log_history[0]  # beta is the reward scale, no KL term


def test_log_z_head_learns_the_partition_function(tiny_model_path, tmp_path):
    # One prompt and a constant raw reward of 1: the residual is log Z(x) + (lp - lp_ref) - beta, with lp = lp_ref while
    # the policy is frozen (learning_rate=0), so only the head can shrink it, from about beta = 15 toward 0.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1="}]}] * 16)
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        dataset,
        reward=constant_reward,
        reward_in_residual="reward",
        learning_rate=0.0,
        log_z_learning_rate=0.05,
        lr_scheduler_type="constant",
        max_steps=12,
    )
    trainer.train()
    residuals = logged(trainer, "flowrl/residual/abs_mean")
    assert residuals[0] == pytest.approx(15.0, abs=2.0)
    assert residuals[-1] < 0.5 * residuals[0]
    assert logged(trainer, "flowrl/logp_gap/mean")[-1] == pytest.approx(0.0, abs=1e-4)


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tiny_model_path, tmp_path, arithmetic_dataset):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = make_trainer(tiny_model_path, tmp_path / "full", arithmetic_dataset, **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / LOG_Z_STATE_NAME).is_file()

    resumed = make_trainer(tiny_model_path, tmp_path / "resumed", arithmetic_dataset, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"policy parameter {name} differs")
    for (name, a), b in zip(full.log_z_head.state_dict().items(), resumed.log_z_head.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"log Z head parameter {name} differs")
    full_opt, resumed_opt = full.log_z_optimizer.state_dict()["state"], resumed.log_z_optimizer.state_dict()["state"]
    assert full_opt.keys() == resumed_opt.keys() and len(full_opt) > 0
    for index in full_opt:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full_opt[index][key], resumed_opt[index][key])
    assert full.log_z_scheduler.state_dict() == resumed.log_z_scheduler.state_dict()
    # The head was trained: it is not the seeded initial head any more
    initial = make_trainer(tiny_model_path, tmp_path / "initial", arithmetic_dataset)
    assert not torch.equal(initial.log_z_head.net[0].weight, full.log_z_head.net[0].weight)


def test_saved_model_has_no_log_z_tensors_and_loads_cleanly(tiny_model_path, tmp_path, arithmetic_dataset):
    trainer = make_trainer(tiny_model_path, tmp_path / "run", arithmetic_dataset, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        saved_keys = set(f.keys())
    reference_keys = set(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict())
    reference_keys.discard("lm_head.weight")  # tied to the embeddings, not stored
    assert saved_keys == reference_keys
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "FlowRL" in card and "2509.15207" in card
    assert "flowrl" in trainer.model.model_tags


def test_peft_lora_run_trains(tiny_model_path, tmp_path, arithmetic_dataset):
    from peft import LoraConfig

    config = FlowRLConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    trainer = FlowRLTrainer(
        model=tiny_model_path,
        reward_funcs=count_digits,
        args=config,
        train_dataset=arithmetic_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    head_before = trainer.log_z_head.net[-1].weight.detach().clone()
    trainer.train()
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero
    assert not torch.equal(head_before, trainer.log_z_head.net[-1].weight)
    assert len(logged(trainer, "flowrl/logp_gap/mean")) == 2


def test_several_optimizer_steps_per_generation_use_importance_weights(tiny_model_path, tmp_path, arithmetic_dataset):
    # Two optimizer steps per generation batch: the second step trains on samples of the previous policy, so TRL
    # provides old log-probs and the sequence weight moves away from 1.
    trainer = make_trainer(
        tiny_model_path, tmp_path, arithmetic_dataset, steps_per_generation=2, learning_rate=1e-2, max_steps=2
    )
    trainer.train()
    weights = logged(trainer, "flowrl/importance_weight/mean")
    assert weights[0] == pytest.approx(1.0, abs=1e-4)
    assert abs(weights[1] - 1.0) > 1e-3


def prepared_batch(trainer, dataset):
    """One generation batch, scored and ready for `_compute_loss`, the way `_prepare_inputs` builds it."""
    trainer.model.train()
    num_rows = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    rows = [dataset[i] for i in range(num_rows // trainer.num_generations)]
    rows = [row for row in rows for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(rows)


def test_gradient_accumulation_gives_the_full_batch_gradient(tiny_model_path, tmp_path, arithmetic_dataset):
    # The same 8 completions trained as one micro-batch, or as two of 4 with gradient accumulation, must give the same
    # gradients, for the policy and for the head.
    grads = {}
    for name, per_device, accumulation in [("one", 8, 1), ("two", 4, 2)]:
        trainer = make_trainer(
            tiny_model_path,
            tmp_path / name,
            arithmetic_dataset,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            max_grad_norm=0.0,
            log_z_dropout=0.0,
        )
        captured = {}
        original_step = trainer._log_z_optimizer_step

        def capture_then_step(trainer=trainer, captured=captured, original_step=original_step):
            captured["head"] = [p.grad.clone() for p in trainer.log_z_head.parameters()]
            captured["policy"] = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
            original_step()

        trainer._log_z_optimizer_step = capture_then_step
        trainer.train()
        grads[name] = captured
    for a, b in zip(grads["one"]["head"], grads["two"]["head"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert len(grads["one"]["policy"]) == len(grads["two"]["policy"]) > 0
    for a, b in zip(grads["one"]["policy"], grads["two"]["policy"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_vllm_importance_sampling_correction_weights_each_sequence(tiny_model_path, tmp_path, arithmetic_dataset):
    from trl_flowrl.flowrl import trajectory_balance_terms

    trainer = make_trainer(tiny_model_path, tmp_path, arithmetic_dataset, log_z_dropout=0.0)
    batch = prepared_batch(trainer, arithmetic_dataset)
    trainer.model.eval()  # eval mode: no accumulation scaling, deterministic head
    base = trainer._compute_loss(trainer.model, batch).item()

    # The keys TRL's vLLM path adds; a sequence-level ratio (TRL's default mode) scales each sequence's term.
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    mask = batch["completion_mask"]
    batch["sampling_per_token_logps"] = torch.zeros_like(mask, dtype=torch.float32)
    batch["importance_sampling_ratio"] = torch.full((mask.size(0), 1), 0.5)
    assert trainer._compute_loss(trainer.model, batch).item() == pytest.approx(0.5 * base, rel=1e-5)

    # A token-level ratio is multiplied over each sequence's tokens.
    batch["importance_sampling_ratio"] = torch.full(mask.shape, 1.01)
    per_sequence = trainer._sequence_sampling_ratio(batch, mask)
    torch.testing.assert_close(per_sequence, 1.01 ** mask.sum(dim=1).float())
    with trainer._capture_prompt_representation(trainer.model, batch["prompt_mask"]) as pooled:
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], mask], dim=1),
            batch["completion_ids"].size(1),
        )
    expected = trajectory_balance_terms(
        log_z=trainer.log_z_head(torch.cat(pooled)),
        per_token_logps=logps,
        ref_per_token_logps=batch["ref_per_token_logps"],
        old_per_token_logps=None,
        advantages=batch["advantages"],
        completion_mask=mask,
        beta=trainer.args.beta,
        sampling_ratio=per_sequence,
    ).loss
    assert trainer._compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_unscorable_completions_are_left_out(tiny_model_path, tmp_path, arithmetic_dataset):
    def sometimes_none(completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    trainer = make_trainer(tiny_model_path, tmp_path, arithmetic_dataset, reward=sometimes_none, max_steps=1)
    batch = prepared_batch(trainer, arithmetic_dataset)
    assert torch.isnan(batch["rewards"][1::2]).all() and not torch.isnan(batch["rewards"][::2]).any()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("objective", ["official", "matching"])
def test_infinite_rewards_are_treated_as_unscorable(tiny_model_path, tmp_path, arithmetic_dataset, objective):
    def sometimes_infinite(completions, **kwargs):
        return [float("inf") if i == 0 else (-float("inf") if i == 1 else 1.0) for i in range(len(completions))]

    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        arithmetic_dataset,
        reward=sometimes_infinite,
        objective=objective,
        reward_in_residual="reward",
        max_steps=2,
    )
    trainer.train()
    assert logged(trainer, "rewards/non_finite") == [pytest.approx(0.5), pytest.approx(0.5)]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


@pytest.mark.multiprocess
def test_ddp_ranks_end_with_identical_heads(tiny_model_path, tmp_path):
    script = tmp_path / "ddp_flowrl.py"
    script.write_text(DDP_SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert states[0]["world_size"] == states[1]["world_size"] == 2
    for name, tensor in states[0]["head"].items():
        assert torch.equal(tensor, states[1]["head"][name]), name
    assert not torch.equal(states[0]["head"]["net.0.weight"], states[0]["initial_head"]["net.0.weight"])
    for name, tensor in states[0]["policy"].items():
        assert torch.equal(tensor, states[1]["policy"][name]), name
    summary = json.loads((tmp_path / "rank0.json").read_text())
    assert summary["global_step"] == 3


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
    output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=3,
    learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, report_to="none",
)
trainer = FlowRLTrainer(model=model_path, reward_funcs=count_digits, args=args, train_dataset=dataset)
initial_head = {k: v.clone() for k, v in trainer.log_z_head.state_dict().items()}
trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "head": trainer.log_z_head.state_dict(),
        "initial_head": initial_head,
        "policy": trainer.accelerator.unwrap_model(trainer.model).state_dict(),
    },
    f"{out}/rank{rank}.pt",
)
if rank == 0:
    json.dump({"global_step": trainer.state.global_step}, open(f"{out}/rank0.json", "w"))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


# -- the matching objective (group estimate of log Z, no head) -------------------------------------------------------


def test_matching_objective_trains_without_a_head(tiny_model_path, tmp_path, arithmetic_dataset):
    trainer = make_trainer(tiny_model_path, tmp_path, arithmetic_dataset, objective="matching")
    assert trainer.log_z_head is None and trainer.log_z_optimizer is None
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.log_z_scheduler is None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert len(logged(trainer, "flowrl/log_z/mean")) == 2
    assert all(torch.isfinite(torch.tensor(logged(trainer, "flowrl/residual/abs_mean"))))


@pytest.mark.parametrize("accumulation", [1, 2])  # 1: TRL computes old log-probs; 2: it does not (one extra pass)
def test_group_estimate_at_generation_equals_the_in_batch_estimate(
    tiny_model_path, tmp_path, arithmetic_dataset, accumulation
):
    # Two micro-batches per generation batch: the loss sees parts of groups, so log Z is estimated at generation, from
    # the sampling policy. Before any step that is the current policy: the estimate must equal the one computed from
    # the whole batch in the loss's own forward pass.
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        arithmetic_dataset,
        objective="matching",
        steps_per_generation=2,
        gradient_accumulation_steps=accumulation,
    )
    batch = prepared_batch(trainer, arithmetic_dataset)
    assert ("old_per_token_logps" in batch) == (accumulation == 1)
    precomputed = batch["flowrl_log_z"]
    assert precomputed.shape == (8,) and torch.equal(batch["flowrl_group"], torch.arange(8) // 4)
    trainer.model.eval()
    with_precomputed = trainer._compute_loss(trainer.model, batch).item()
    del batch["flowrl_log_z"]
    assert trainer._compute_loss(trainer.model, batch).item() == pytest.approx(with_precomputed, rel=1e-5)
    in_batch = trainer._metrics["eval"]["flowrl/log_z/mean"][-1]
    assert in_batch == pytest.approx(precomputed.mean().item(), rel=1e-5, abs=1e-5)


def test_matching_checkpoint_resume_reproduces_an_uninterrupted_run(tiny_model_path, tmp_path, arithmetic_dataset):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, objective="matching")
    full = make_trainer(tiny_model_path, tmp_path / "full", arithmetic_dataset, **common)
    full.train()
    state = torch.load(tmp_path / "full" / "checkpoint-2" / LOG_Z_STATE_NAME, weights_only=True)
    assert state["head"] is None and state["settings"]["log_z_estimate"] == "group"
    resumed = make_trainer(tiny_model_path, tmp_path / "resumed", arithmetic_dataset, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"policy parameter {name} differs")


def first_half_rewarded(completions, **kwargs):
    """1 for the first half of the batch, 0 for the rest: constant within a prompt's group when a batch holds two
    prompts, split within the group when it holds one."""
    return [float(i < len(completions) / 2) for i in range(len(completions))]


@pytest.mark.parametrize("num_generations_eval, per_device_eval_batch_size", [(2, 4), (8, 8)])
def test_evaluation_estimates_log_z_per_prompt(
    tiny_model_path, tmp_path, arithmetic_dataset, num_generations_eval, per_device_eval_batch_size
):
    # Evaluation samples num_generations_eval completions per prompt, not num_generations: the group estimate must
    # group them by prompt. The expected loss is recomputed from each evaluation batch with groups read from the prompt
    # tokens themselves; before any training step the policy is the reference, so its log-probs are the reference's.
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        arithmetic_dataset,
        reward=first_half_rewarded,
        objective="matching",
        num_generations=4,
        num_generations_eval=num_generations_eval,
        per_device_eval_batch_size=per_device_eval_batch_size,
    )
    # Each batch's loss is compared, not eval_loss: the Trainer weighs the last evaluation batch by the dataset's row
    # count, not by its completions.
    batches, losses = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def record_batch(inputs):
        batches.append(generate(inputs))
        return batches[-1]

    def record_loss(model, inputs):
        loss = compute_loss(model, inputs)
        losses.append(loss.item())
        return loss

    trainer._generate_and_score_completions, trainer._compute_loss = record_batch, record_loss
    metrics = trainer.evaluate(eval_dataset=arithmetic_dataset.select(range(4)))

    expected = []
    for batch in batches:
        _, prompt_group = torch.unique(batch["prompt_ids"], dim=0, return_inverse=True)
        expected.append(
            trajectory_balance_terms(
                log_z=None,
                per_token_logps=batch["ref_per_token_logps"],
                ref_per_token_logps=batch["ref_per_token_logps"],
                old_per_token_logps=None,
                advantages=batch["rewards"],
                completion_mask=batch["completion_mask"],
                beta=trainer.args.beta,
                normalization=trainer.args.residual_normalization,
                group_index=prompt_group,
            ).loss.item()
        )
    assert metrics["eval_flowrl/logp_gap/mean"] == pytest.approx(0.0, abs=1e-5)
    assert len(losses) == len(expected) == 4 * num_generations_eval // per_device_eval_batch_size
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if num_generations_eval == 2:  # each prompt's rewards are constant: every residual is zero
        assert losses == pytest.approx([0.0] * len(losses), abs=1e-6)
    else:  # half of each prompt's completions are rewarded: residuals of beta/2 divided by the length
        assert min(losses) > 0.5


def test_direct_evaluation_of_partial_groups_is_refused(tiny_model_path, tmp_path, arithmetic_dataset):
    # No evaluation is scheduled, so the config does not check the evaluation batch: trainer.evaluate() must, before
    # estimating log Z from half of each prompt's completions.
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        arithmetic_dataset,
        objective="matching",
        num_generations=4,
        num_generations_eval=4,
        per_device_eval_batch_size=2,
    )
    assert trainer.args.eval_strategy == "no" and trainer.args.log_z_estimate == "group"
    generated = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: generated.append(inputs) or generate(inputs)
    with pytest.raises(ValueError, match=r"holds 2 completions .* Set per_device_eval_batch_size to a multiple of 4"):
        trainer.evaluate(eval_dataset=arithmetic_dataset.select(range(2)))
    assert len(generated) == 1  # refused at the first batch


@pytest.mark.multiprocess
def test_evaluation_groups_split_across_processes_are_refused(tiny_model_path, tmp_path):
    # Two processes, two completions each, four per prompt: the global batch holds whole groups (TRL's reshape works),
    # but each process would estimate log Z from half a group. Every rank must refuse, before any collective.
    script = tmp_path / "eval_split.py"
    script.write_text(EVAL_SPLIT_SCRIPT)
    run_distributed(script, tiny_model_path, str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "holds 2 completions on this process" in message, message
        assert "Set per_device_eval_batch_size to a multiple of 4" in message


EVAL_SPLIT_SCRIPT = """
import sys

from datasets import Dataset
from trl_flowrl import FlowRLConfig, FlowRLTrainer

model_path, out = sys.argv[1:3]


def constant(completions, **kwargs):
    return [1.0] * len(completions)


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(8)])
args = FlowRLConfig(
    output_dir=out, per_device_train_batch_size=4, num_generations=4, num_generations_eval=4,
    per_device_eval_batch_size=2, max_completion_length=8, objective="matching", use_cpu=True, bf16=False,
    report_to="none", seed=0,
)
trainer = FlowRLTrainer(
    model=model_path, reward_funcs=constant, args=args, train_dataset=dataset
)
try:
    trainer.evaluate(eval_dataset=dataset.select(range(2)))
    message = "evaluated"
except ValueError as error:
    message = str(error)
with open(f"{out}/rank{trainer.accelerator.process_index}.txt", "w") as f:
    f.write(message)
trainer.accelerator.end_training()
"""


# -- checkpoints: written before push and rotation, checked on resume --------------------------------------------------


def test_log_z_state_is_in_the_checkpoint_before_it_is_pushed(tiny_model_path, tmp_path, arithmetic_dataset):
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        arithmetic_dataset,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
    )
    seen = []
    trainer.args.push_to_hub = True  # after construction: no hub repository is created
    trainer._push_from_checkpoint = lambda folder: seen.append(sorted(p.name for p in Path(folder).iterdir()))
    trainer.train()
    assert len(seen) == 2 and all(LOG_Z_STATE_NAME in names for names in seen)
    # rotation kept only the last checkpoint, and it is complete
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / LOG_Z_STATE_NAME).is_file()
    assert not list(tmp_path.glob("checkpoint-*/*.tmp"))


@pytest.fixture(scope="module")
def official_checkpoint(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("official-run")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(8)])
    make_trainer(tiny_model_path, out, dataset, max_steps=1, save_strategy="steps", save_steps=1).train()
    return out / "checkpoint-1"


def copy_checkpoint(checkpoint, destination):
    import shutil

    return Path(shutil.copytree(checkpoint, destination))


def test_resume_refuses_changed_target_settings(tiny_model_path, tmp_path, arithmetic_dataset, official_checkpoint):
    assert saved_config_class(str(official_checkpoint)) == "FlowRLConfig"
    for change, message in [
        ({"beta": 10.0}, "beta: saved 15.0, now 10.0"),
        ({"log_z_pooling": "last"}, "log_z_pooling: saved 'mean', now 'last'"),
        ({"objective": "matching"}, "log_z_estimate: saved 'head', now 'group'"),
    ]:
        trainer = make_trainer(tiny_model_path, tmp_path / "run", arithmetic_dataset, max_steps=2, **change)
        with pytest.raises(ValueError, match=message):
            trainer.train(resume_from_checkpoint=str(official_checkpoint))


def test_resume_with_another_head_learning_rate_keeps_the_saved_one_and_says_so(
    tiny_model_path, tmp_path, arithmetic_dataset, official_checkpoint, caplog
):
    trainer = make_trainer(tiny_model_path, tmp_path, arithmetic_dataset, max_steps=2, log_z_learning_rate=0.5)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(official_checkpoint))
    assert "saved learning rate 0.001" in caplog.text
    assert trainer.log_z_scheduler.base_lrs == [pytest.approx(1e-3)]  # the saved schedule, not 0.5


def test_resume_from_a_corrupt_or_missing_state_fails_clearly(
    tiny_model_path, tmp_path, arithmetic_dataset, official_checkpoint
):
    truncated = copy_checkpoint(official_checkpoint, tmp_path / "truncated" / "checkpoint-1")
    data = (truncated / LOG_Z_STATE_NAME).read_bytes()
    (truncated / LOG_Z_STATE_NAME).write_bytes(data[: len(data) // 2])
    trainer = make_trainer(tiny_model_path, tmp_path / "a", arithmetic_dataset, max_steps=2)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        trainer.train(resume_from_checkpoint=str(truncated))

    missing = copy_checkpoint(official_checkpoint, tmp_path / "missing" / "checkpoint-1")
    (missing / LOG_Z_STATE_NAME).unlink()
    trainer = make_trainer(tiny_model_path, tmp_path / "b", arithmetic_dataset, max_steps=2)
    with pytest.raises(FileNotFoundError, match="written by FlowRLTrainer but has no"):
        trainer.train(resume_from_checkpoint=str(missing))


def test_resume_with_a_head_of_another_size_names_the_file(
    tiny_model_path, tmp_path, arithmetic_dataset, official_checkpoint
):
    from trl_flowrl.flowrl.log_z import LogZHead

    checkpoint = copy_checkpoint(official_checkpoint, tmp_path / "other-model" / "checkpoint-1")
    path = checkpoint / LOG_Z_STATE_NAME
    state = torch.load(path, weights_only=True)
    hidden = state["head"]["net.0.weight"].shape[1]
    state["head"] = LogZHead(hidden + 8).state_dict()  # as written by a run on a wider model
    torch.save(state, path)
    trainer = make_trainer(tiny_model_path, tmp_path / "run", arithmetic_dataset, max_steps=2)
    with pytest.raises(
        ValueError, match=rf"{LOG_Z_STATE_NAME}: it was saved for a policy of hidden size {hidden + 8}"
    ) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(path) in str(error.value) and f"has hidden size {hidden}" in str(error.value)


def test_an_intact_file_that_cannot_be_used_is_not_called_corrupt(
    tiny_model_path, tmp_path, arithmetic_dataset, official_checkpoint
):
    checkpoint = copy_checkpoint(official_checkpoint, tmp_path / "replaced" / "checkpoint-1")
    torch.save({"weights": torch.zeros(2)}, checkpoint / LOG_Z_STATE_NAME)
    trainer = make_trainer(tiny_model_path, tmp_path / "run", arithmetic_dataset, max_steps=2)
    with pytest.raises(ValueError, match="is complete but is not a FlowRL state") as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "corrupt" not in str(error.value)


def test_state_file_checks_tell_damage_from_other_problems(tmp_path):
    from trl_flowrl.flowrl.flowrl_trainer import _read_state

    path = tmp_path / LOG_Z_STATE_NAME
    torch.save({"head": {"w": torch.ones(256)}, "optimizer": {}, "scheduler": None}, path)
    assert torch.equal(_read_state(str(path))["head"]["w"], torch.ones(256))
    data = bytearray(path.read_bytes())
    data[data.find(torch.ones(1).numpy().tobytes()) + 1] ^= 0xFF  # one damaged byte in the tensor data
    path.write_bytes(bytes(data))
    assert "is corrupt or truncated" in _read_state(str(path)) and "fails its CRC check" in _read_state(str(path))
    path.write_bytes(bytes(data[: len(data) // 2]))
    assert "is corrupt or truncated" in _read_state(str(path))
    torch.save([1, 2], path)
    assert "is complete but is not a FlowRL state (a list" in _read_state(str(path))


@pytest.mark.multiprocess
@needs_transformers_5_18
def test_a_checkpoint_written_by_one_process_resumes_with_two(tiny_model_path, tmp_path, official_checkpoint):
    # The checkpoint was written by one process; two resume it, and only rank 0 can see the saved state. Each rank's
    # head, right after the checkpoint is loaded, must be the saved one (not the fresh head it was built with), and
    # training goes on from there.
    script = tmp_path / "resume_ddp.py"
    script.write_text(RESUME_DDP_SCRIPT)
    run_distributed(script, tiny_model_path, str(official_checkpoint), str(tmp_path))
    saved = torch.load(official_checkpoint / LOG_Z_STATE_NAME, weights_only=True)
    for rank in range(2):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert record["world_size"] == 2 and record["global_step"] == 2
        for name, tensor in saved["head"].items():
            torch.testing.assert_close(record["loaded_head"][name], tensor, rtol=0, atol=0, msg=name)
        assert not torch.equal(record["fresh_head"]["net.0.weight"], saved["head"]["net.0.weight"])
        assert record["head_optimizer_steps"] == saved["optimizer"]["state"][0]["step"].item() + 1


RESUME_DDP_SCRIPT = """
import os
import sys
import zipfile

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl.flowrl.flowrl_trainer import LOG_Z_STATE_NAME

model_path, checkpoint, out = sys.argv[1:4]


def count_digits(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


class RecordLoadedHead(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):  # runs right after the checkpoint is loaded
        self.head = {k: v.detach().clone() for k, v in trainer.log_z_head.state_dict().items()}


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(8)])
args = FlowRLConfig(
    output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2,
    learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, report_to="none", seed=0,
)
record = RecordLoadedHead()
trainer = FlowRLTrainer(
    model=model_path, reward_funcs=count_digits, args=args, train_dataset=dataset, callbacks=[record]
)
fresh_head = {k: v.clone() for k, v in trainer.log_z_head.state_dict().items()}

# Only the main process may see the saved state: the others behave as if it lived on another machine's disk (storage
# not shared, a stale NFS cache), so they must take the main process's verdict rather than look for themselves.
def hidden(path):
    return trainer.accelerator.process_index != 0 and str(path).endswith(LOG_Z_STATE_NAME)


original_isfile, original_load, original_zipfile = os.path.isfile, torch.load, zipfile.ZipFile


def load(path, *args, **kwargs):
    if hidden(path):
        raise FileNotFoundError(path)
    return original_load(path, *args, **kwargs)


def open_zip(path, *args, **kwargs):
    if hidden(path):
        raise FileNotFoundError(path)
    return original_zipfile(path, *args, **kwargs)


os.path.isfile = lambda path: original_isfile(path) and not hidden(path)
torch.load, zipfile.ZipFile = load, open_zip
trainer.train(resume_from_checkpoint=checkpoint)
os.path.isfile, torch.load, zipfile.ZipFile = original_isfile, original_load, original_zipfile
first_parameter = next(trainer.log_z_head.parameters())
torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "fresh_head": fresh_head,
        "loaded_head": record.head,
        "head_optimizer_steps": int(trainer.log_z_optimizer.state[first_parameter]["step"]),
    },
    f"{out}/rank{trainer.accelerator.process_index}.pt",
)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_resume_from_a_grpo_checkpoint_starts_a_fresh_head(tiny_model_path, tmp_path, arithmetic_dataset, caplog):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    GRPOTrainer(model=tiny_model_path, reward_funcs=count_digits, args=args, train_dataset=arithmetic_dataset).train()
    checkpoint = tmp_path / "grpo" / "checkpoint-1"
    assert saved_config_class(str(checkpoint)) == "GRPOConfig"
    trainer = make_trainer(tiny_model_path, tmp_path / "flowrl", arithmetic_dataset, max_steps=2)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2
    assert "freshly initialised log Z head" in caplog.text and "GRPOConfig" in caplog.text


# -- drop-in details: dropout (the MoE router loss is in test_compatibility.py) ---------------------------------------


def test_disable_dropout_reaches_the_log_z_head(tiny_model_path, tmp_path, arithmetic_dataset):
    default = make_trainer(tiny_model_path, tmp_path / "a", arithmetic_dataset)
    assert {m.p for m in default.log_z_head.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    disabled = make_trainer(tiny_model_path, tmp_path / "b", arithmetic_dataset, disable_dropout=True)
    assert {m.p for m in disabled.log_z_head.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
