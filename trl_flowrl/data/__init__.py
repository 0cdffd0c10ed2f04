"""Prompt datasets for the papers' recipes: training sets and evaluation sets, from the hub or a local copy.

`DATASETS` maps short names to loaders; every loader takes `local_path=` (a downloaded copy) and returns a TRL prompt
dataset with a conversational `prompt` column and the column its reward reads (`solution` for math, `tests` for code).

```python
from trl_flowrl.data import DATASETS

train = DATASETS["dapo_math"]()                           # from the hub (or its cache)
math500 = DATASETS["math500"](local_path="./MATH-500")    # from `huggingface-cli download ... --local-dir`
```
"""

from .code_datasets import code_prompt, decode_lcb_tests, load_deepcoder, load_humanevalplus, load_livecodebench
from .hub import DatasetUnavailableError, load_split
from .math_datasets import (
    BOXED_INSTRUCTION,
    DAPO_PREFIX,
    DAPO_SUFFIX,
    apply_template,
    load_aime24,
    load_aime25,
    load_amc23,
    load_dapo_math,
    load_math500,
    load_minerva,
    load_olympiadbench,
    load_openr1_math,
    strip_dapo_template,
)


TRAIN_DATASETS = {"dapo_math": load_dapo_math, "openr1_math": load_openr1_math, "deepcoder": load_deepcoder}
MATH_EVAL_DATASETS = {
    "math500": load_math500,
    "aime24": load_aime24,
    "aime25": load_aime25,
    "amc23": load_amc23,
    "minerva": load_minerva,
    "olympiadbench": load_olympiadbench,
}
CODE_EVAL_DATASETS = {"humanevalplus": load_humanevalplus, "livecodebench": load_livecodebench}
DATASETS = {**TRAIN_DATASETS, **MATH_EVAL_DATASETS, **CODE_EVAL_DATASETS}

__all__ = [
    "BOXED_INSTRUCTION",
    "CODE_EVAL_DATASETS",
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "DATASETS",
    "DatasetUnavailableError",
    "MATH_EVAL_DATASETS",
    "TRAIN_DATASETS",
    "apply_template",
    "code_prompt",
    "decode_lcb_tests",
    "load_aime24",
    "load_aime25",
    "load_amc23",
    "load_dapo_math",
    "load_deepcoder",
    "load_humanevalplus",
    "load_livecodebench",
    "load_math500",
    "load_minerva",
    "load_olympiadbench",
    "load_openr1_math",
    "load_split",
    "strip_dapo_template",
]
