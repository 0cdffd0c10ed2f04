"""Check that plain `trl.GRPOTrainer` improves the embedded tiny model on the built-in arithmetic task.

    python scripts/grpo_feasibility.py                      # the embedded model, default settings
    python scripts/grpo_feasibility.py --model /tmp/m --learning_rate 5e-4 --max_steps 100

Evaluates on held-out problems before and after training (samples at temperature 1.0, TRL's default) and prints
accuracy, distinct correct paths per problem and the wall time of the whole run. It is the evidence that the
recipes' default setting has signal; it is not a recipe.
"""

import argparse
import os
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_flowrl.tasks import (  # noqa: E402
    MAX_VALUE,
    arithmetic_dataset,
    boxed_accuracy_reward,
    embedded_model_path,
    evaluate_arithmetic,
    generate_problems,
)


def main():
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_value", type=int, default=MAX_VALUE)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--eval_problems", type=int, default=64)
    parser.add_argument("--eval_samples", type=int, default=8)
    parser.add_argument("--eval_every", type=int, default=0, help="also evaluate every this many steps (0: off)")
    parser.add_argument("--num_threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)

    model_path = args.model or embedded_model_path()
    max_value = args.max_value
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    held_out = generate_problems(args.eval_problems, args.seed, "test", max_value=max_value)

    def evaluate(label):
        t = time.perf_counter()
        result = evaluate_arithmetic(
            model, tokenizer, held_out, args.eval_samples, max_new_tokens=args.max_completion_length, seed=args.seed
        )
        print(f"{label}: {result.summary()} ({time.perf_counter() - t:.1f}s)", flush=True)
        return result

    before = evaluate("before")
    train_dataset = arithmetic_dataset(2000, args.seed, "train", max_value=max_value)
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,
            report_to="none",
            seed=args.seed,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            per_device_train_batch_size=args.per_device_train_batch_size,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            max_steps=args.max_steps,
            temperature=args.temperature,
            beta=args.beta,
            gradient_checkpointing=False,
            logging_steps=10,
            save_strategy="no",
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=boxed_accuracy_reward,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        if args.eval_every:

            class Evaluate(TrainerCallback):
                def on_step_end(self, _args, state, control, **kwargs):
                    if state.global_step % args.eval_every == 0 and state.global_step < args.max_steps:
                        evaluate(f"step {state.global_step}")

            trainer.add_callback(Evaluate())
        t = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t
    after = evaluate("after")
    print(
        f"GRPO {args.max_steps} steps in {train_seconds:.0f}s; accuracy {100 * before.accuracy:.1f}% -> "
        f"{100 * after.accuracy:.1f}%, distinct correct paths {before.distinct_correct_paths:.2f} -> "
        f"{after.distinct_correct_paths:.2f}; whole run {time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
