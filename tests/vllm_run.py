"""One short training run with real vLLM colocate generation, for `tests/test_vllm.py`.

    python tests/vllm_run.py MODEL_PATH OUTPUT_DIR --trainer flowrl --objective official --steps 6 [--no-sync] ...

Each run is its own process (a colocate engine initialises torch.distributed and owns its memory), and several
processes are started with `torch.distributed.run`. It writes `OUTPUT_DIR/result-rank{N}.json`: the logged history
and what the test needs to check besides it: the parameter names sent to vLLM at each weight sync, the log Z head
before and after, ExGRPO's buffer.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from datasets import Dataset


def distinct_character_share(completions, **kwargs):
    """A reward that varies between the completions of any policy, trained or not: the share of distinct characters."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(text)) / max(len(text), 1) for text in texts]


def starts_with_digit(completions, **kwargs):
    """A 0/1 reward that a random model earns on a fair share of its samples, so ExGRPO's buffer fills up."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(text[:1].isdigit() or text[:1] in "+-=") for text in texts]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("output_dir")
    parser.add_argument("--trainer", choices=["flowrl", "exgrpo"], default="flowrl")
    parser.add_argument("--objective", default="official")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--learning_rate", type=float, default=3e-2)
    parser.add_argument("--no-sync", action="store_true", help="never push the trained weights to the engine")
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--replay_share", type=float, default=0.0, help="FlowRL's replay of past rollouts")
    args = parser.parse_args()

    from trl_flowrl import ExGRPOConfig, ExGRPOTrainer, FlowRLConfig, FlowRLTrainer

    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(1, 9) for b in range(1, 9)]
    )
    common = dict(
        output_dir=args.output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=4,
        max_completion_length=12,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
    )
    if args.trainer == "flowrl":
        config = FlowRLConfig(objective=args.objective, replay_share=args.replay_share, **common)
        trainer_class, reward = FlowRLTrainer, distinct_character_share
    else:
        config = ExGRPOConfig(delayed_start_threshold=0.0, **common)
        trainer_class, reward = ExGRPOTrainer, starts_with_digit

    peft_config = None
    if args.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    from trl_flowrl.vllm_cpu import keep_cpu_weights_loadable

    keep_cpu_weights_loadable(config)  # as a script of one's own does on a CPU (the recipes do it themselves)
    trainer = trainer_class(
        model=args.model_path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=peft_config
    )
    generation = trainer.vllm_generation

    # Record what each weight sync sends to the engine, by name.
    synced_names = []
    iterate = generation._iter_named_params

    def recording_iterate(*a, **kw):
        names = []
        for name, param in iterate(*a, **kw):
            names.append(name)
            yield name, param
        synced_names.append(names)

    generation._iter_named_params = recording_iterate
    if args.no_sync:
        generation.sync_weights = lambda: None

    # What reached the loss: TRL's vLLM importance-sampling ratio, per row.
    ratios, replayed_rows = [], []
    if args.trainer == "flowrl":
        sequence_ratio = trainer._sequence_sampling_ratio

        def recording_sequence_ratio(inputs, mask):
            weight = sequence_ratio(inputs, mask)
            ratios.append(None if weight is None else weight.tolist())
            # which rows of the loss call were replayed (none before the store holds a whole group)
            replayed = inputs.get("flowrl_replayed")
            replayed_rows.append([False] * mask.size(0) if replayed is None else replayed.tolist())
            return weight

        trainer._sequence_sampling_ratio = recording_sequence_ratio
    else:
        compute_loss = trainer._compute_loss

        def recording_compute_loss(model, inputs):
            replayed = inputs["replay_mask"]
            ratio = inputs["importance_sampling_ratio"].reshape(replayed.size(0), -1)
            mask = inputs["completion_mask"].bool()
            if ratio.size(1) > 1:  # token-level: the ratios of real tokens only
                ratio = torch.where(mask, ratio, torch.ones_like(ratio))
            ratios.append({"replayed": ratio[replayed].tolist(), "fresh": ratio[~replayed].tolist()})
            return compute_loss(model, inputs)

        trainer._compute_loss = recording_compute_loss

    head = getattr(trainer, "log_z_head", None)
    head_before = [p.detach().clone() for p in head.parameters()] if head is not None else None

    trainer.train(resume_from_checkpoint=args.resume)

    result = {
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "synced_names": synced_names,
        "policy_parameter_names": [n for n, _ in trainer.model.named_parameters()],
        "ratios_in_loss": ratios,
        "replayed_in_loss": replayed_rows,
        "log_z_head": head is not None,
    }
    if head is not None:
        result["log_z_head_change"] = max(
            (after.detach() - before).abs().max().item() for before, after in zip(head_before, head.parameters())
        )
    if args.trainer == "exgrpo":
        result["buffer_trajectories"] = trainer.replay_buffer.num_trajectories
    rank = int(os.environ.get("RANK", "0"))
    Path(args.output_dir, f"result-rank{rank}.json").write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
