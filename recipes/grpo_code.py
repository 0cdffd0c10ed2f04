"""The GRPO baseline (trl.GRPOTrainer, unchanged) on code, with the same data, reward and settings as flowrl_code.py.

    python recipes/grpo_code.py           # the embedded tiny model on the built-in programming task (CPU, minutes)
    accelerate launch recipes/grpo_code.py --config recipes/configs/grpo_r1-distill-qwen-7b_deepcoder.yaml

Every option of trl.GRPOConfig, of trl.ModelConfig and of trl_flowrl.recipe.RecipeArguments can be set in the YAML
file or on the command line.
"""

from pathlib import Path

from trl import GRPOConfig, GRPOTrainer

from trl_flowrl.recipe import finish, parse_recipe_args, run


if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_args(
        GRPOConfig, Path(__file__).parent / "configs" / "embedded" / "grpo_programs.yaml", default_dataset="programs"
    )
    trainer = run(GRPOTrainer, script_args, training_args, model_args)
    finish(trainer)
