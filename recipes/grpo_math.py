"""The GRPO baseline (trl.GRPOTrainer, unchanged) with the same data, reward and settings as the other recipes.

    python recipes/grpo_math.py           # the embedded tiny model on the built-in task (CPU, minutes)
    accelerate launch recipes/grpo_math.py --config recipes/configs/grpo_qwen2.5-7b_dapo-math.yaml

Every option of trl.GRPOConfig, of trl.ModelConfig and of trl_flowrl.recipe.RecipeArguments can be set in the YAML
file or on the command line.
"""

from pathlib import Path

from trl import GRPOConfig, GRPOTrainer

from trl_flowrl.recipe import finish, parse_recipe_args, run


if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_args(
        GRPOConfig, Path(__file__).parent / "configs" / "embedded" / "grpo_arithmetic.yaml"
    )
    trainer = run(GRPOTrainer, script_args, training_args, model_args)
    finish(trainer)
