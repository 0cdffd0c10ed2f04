"""FlowRL (reward-distribution matching) on math.

    python recipes/flowrl_math.py           # the embedded tiny model on the built-in task (CPU, minutes), with the
                                            # matching objective (a departure from the paper, see FlowRLConfig)
    accelerate launch recipes/flowrl_math.py --config recipes/configs/flowrl_qwen2.5-7b_dapo-math.yaml    # the paper's setup

Every option of FlowRLConfig, of trl.ModelConfig and of trl_flowrl.recipe.RecipeArguments can be set in the YAML file
or on the command line; see README.md for multi-GPU, DeepSpeed, FSDP and vLLM.
"""

from pathlib import Path

from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl.recipe import finish, parse_recipe_args, run


if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_args(
        FlowRLConfig, Path(__file__).parent / "configs" / "embedded" / "flowrl_arithmetic.yaml"
    )
    trainer = run(FlowRLTrainer, script_args, training_args, model_args)
    trainer.accelerator.print(training_args.describe_objective())
    finish(trainer)
