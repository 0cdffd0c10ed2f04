"""The built-in arithmetic task and the tiny pre-trained model that the recipes train by default.

Everything here works offline: problems are generated from a seed, and the model ships inside the package
(`embedded_model_path()`), so a `pip install` user can run the default recipes with no hub access.
"""

from pathlib import Path

from .arithmetic import (
    HELD_OUT_PERCENT,
    MAX_VALUE,
    NUM_TERMS,
    ArithmeticProblem,
    boxed_accuracy_reward,
    count_paths,
    enumerate_paths,
    extract_boxed,
    generate_problems,
    is_correct,
    is_held_out,
    path_id,
)
from .data import arithmetic_dataset, arithmetic_sft_dataset, problems_from_dataset
from .evaluation import ArithmeticEvaluation, evaluate_arithmetic, grade_samples, path_log_probs, sample_completions


EMBEDDED_MODEL_NAME = "tiny-qwen2-arithmetic"


def embedded_model_path() -> str:
    """Directory of the embedded tiny model inside the installed package (pass it as `model_name_or_path`).

    Raises FileNotFoundError when the package was installed without its data files.
    """
    path = Path(__file__).resolve().parent.parent / "assets" / EMBEDDED_MODEL_NAME
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The embedded model is missing from {path}. Reinstall trl-flowrl from a wheel or source tree that "
            "includes trl_flowrl/assets, or regenerate it with `python scripts/pretrain_tiny_model.py`."
        )
    return str(path)


__all__ = [
    "EMBEDDED_MODEL_NAME",
    "HELD_OUT_PERCENT",
    "MAX_VALUE",
    "NUM_TERMS",
    "ArithmeticEvaluation",
    "ArithmeticProblem",
    "arithmetic_dataset",
    "arithmetic_sft_dataset",
    "boxed_accuracy_reward",
    "count_paths",
    "embedded_model_path",
    "enumerate_paths",
    "evaluate_arithmetic",
    "extract_boxed",
    "generate_problems",
    "grade_samples",
    "is_correct",
    "is_held_out",
    "path_id",
    "path_log_probs",
    "problems_from_dataset",
    "sample_completions",
]
