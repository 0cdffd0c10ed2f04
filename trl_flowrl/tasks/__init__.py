"""The built-in tasks and the tiny pre-trained models that the recipes train by default.

- `arithmetic` (`arithmetic.py`): sums of small numbers with several valid reasoning paths, graded by the boxed answer
  (the math recipes' default);
- `programs` (`programming.py`): small stdin/stdout programming problems with tests and several correct programs,
  graded in the local sandbox (the code recipe's default).

Everything here works offline: problems are generated from a seed, and each task's model ships inside the package
(`embedded_model_path(task)`), so a `pip install` user can run the default recipes with no hub access. Evaluation
(accuracy, distinct correct paths or programs) is `trl_flowrl.evaluation`'s `arithmetic_benchmark` and
`programs_benchmark`.
"""

from pathlib import Path

from . import programming
from .arithmetic import (
    HELD_OUT_PERCENT,
    MAX_VALUE,
    NUM_TERMS,
    ArithmeticProblem,
    count_paths,
    enumerate_paths,
    generate_problems,
    is_held_out,
    path_id,
)
from .data import (
    arithmetic_dataset,
    arithmetic_sft_dataset,
    problems_from_dataset,
    programming_dataset,
    programming_problems_from_dataset,
    programming_sft_dataset,
)
from .likelihood import path_log_probs
from .programming import NUM_CASES, ProgrammingProblem, enumerate_programs, program_id


EMBEDDED_MODELS = {"arithmetic": "tiny-qwen2-arithmetic", "programs": "tiny-qwen2-programs"}
"""Built-in task -> folder of its embedded model under `trl_flowrl/assets`."""


def embedded_model_path(task: str = "arithmetic") -> str:
    """Directory of the embedded tiny model of `task` ("arithmetic" or "programs") inside the installed package.

    Pass it as `model_name_or_path`. Raises ValueError for an unknown task, and FileNotFoundError when the package
    was installed without its data files.
    """
    if task not in EMBEDDED_MODELS:
        raise ValueError(f"task must be one of {sorted(EMBEDDED_MODELS)}, got {task!r}.")
    path = Path(__file__).resolve().parent.parent / "assets" / EMBEDDED_MODELS[task]
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The embedded model is missing from {path}. Reinstall trl-flowrl from a wheel or source tree that "
            f"includes trl_flowrl/assets, or regenerate it with `python scripts/pretrain_tiny_model.py --task {task}`."
        )
    return str(path)


__all__ = [
    "EMBEDDED_MODELS",
    "HELD_OUT_PERCENT",
    "MAX_VALUE",
    "NUM_CASES",
    "NUM_TERMS",
    "ArithmeticProblem",
    "ProgrammingProblem",
    "arithmetic_dataset",
    "arithmetic_sft_dataset",
    "count_paths",
    "embedded_model_path",
    "enumerate_paths",
    "enumerate_programs",
    "generate_problems",
    "is_held_out",
    "path_id",
    "path_log_probs",
    "problems_from_dataset",
    "program_id",
    "programming",
    "programming_dataset",
    "programming_problems_from_dataset",
    "programming_sft_dataset",
]
