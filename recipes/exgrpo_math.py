"""ExGRPO (GRPO with a replay buffer of past successes) on math.

    python recipes/exgrpo_math.py           # the embedded tiny model on the built-in task (CPU, minutes)
    accelerate launch recipes/exgrpo_math.py --config recipes/configs/exgrpo_qwen2.5-math-7b_openr1.yaml    # the paper's setup

Every option of ExGRPOConfig, of trl.ModelConfig and of trl_flowrl.recipe.RecipeArguments can be set in the YAML file
or on the command line; see README.md for multi-GPU, DeepSpeed, FSDP and vLLM.
"""

from pathlib import Path

from trl_flowrl import ExGRPOConfig, ExGRPOTrainer
from trl_flowrl.recipe import finish, parse_recipe_args, run


if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_args(
        ExGRPOConfig, Path(__file__).parent / "configs" / "embedded" / "exgrpo_arithmetic.yaml"
    )
    trainer = run(ExGRPOTrainer, script_args, training_args, model_args)
    finish(trainer)
