"""FlowRL (reward-distribution matching) on code: programs run against tests in a sandbox.

    python recipes/flowrl_code.py           # the embedded tiny model on the built-in programming task (CPU, minutes)
    accelerate launch recipes/flowrl_code.py --config recipes/configs/flowrl_r1-distill-qwen-7b_deepcoder.yaml

Every option of FlowRLConfig, of trl.ModelConfig and of trl_flowrl.recipe.RecipeArguments (the sandbox: code_executor,
code_timeout, ...) can be set in the YAML file or on the command line; see README.md for multi-GPU and vLLM.
"""

from pathlib import Path

from trl_flowrl import FlowRLConfig, FlowRLTrainer
from trl_flowrl.recipe import finish, parse_recipe_args, run


if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_args(
        FlowRLConfig,
        Path(__file__).parent / "configs" / "embedded" / "flowrl_programs.yaml",
        default_dataset="programs",
    )
    trainer = run(FlowRLTrainer, script_args, training_args, model_args)
    trainer.accelerator.print(training_args.describe_objective())
    finish(trainer)
