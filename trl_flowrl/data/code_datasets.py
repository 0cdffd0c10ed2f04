"""Code prompt datasets for TRL: a conversational `prompt`, the normalised tests in `tests` (a JSON string read by
`CodeReward`), and metadata.

The prompts follow LiveCodeBench's code-generation instructions, which DeepCoder also trains with: a problem that
reads stdin and writes stdout asks for a complete program; a problem with starter code (LeetCode style, HumanEval+)
asks to complete it. Both ask for the code in a fenced block, which `CodeReward` extracts.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import zlib

from datasets import Dataset, concatenate_datasets

from ..rewards.code_reward import normalize_tests
from .hub import load_split


logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate a "
    "correct Python program that matches the specification and passes all tests."
)
STDIN_FORMAT = (
    "Read the inputs from stdin, solve the problem and write the answer to stdout (do not test on the sample inputs "
    "directly). Enclose your code within delimiters as follows:\n```python\n# YOUR CODE HERE\n```"
)
STARTER_FORMAT = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters.\n```python\n{starter_code}\n```"
)


def code_prompt(problem: str, starter_code: str | None = None) -> list[dict[str, str]]:
    """System + user messages asking for a fenced Python solution (stdin/stdout, or completing `starter_code`)."""
    fmt = (
        STARTER_FORMAT.format(starter_code=starter_code.strip())
        if starter_code and starter_code.strip()
        else STDIN_FORMAT
    )
    user = f"### Question:\n{problem.strip()}\n\n### Format: {fmt}\n\n### Answer: (use the provided format with backticks)\n"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _json_or(value, default):
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return default
    return value


def _keep_valid(ds: Dataset, name: str) -> Dataset:
    valid = ds.filter(lambda tests: tests is not None, input_columns="tests")
    if len(valid) < len(ds):
        logger.warning(
            "%s: dropped %d row(s) whose tests are empty or in an unknown format.", name, len(ds) - len(valid)
        )
    return valid


def _normalized(raw) -> str | None:
    try:
        spec = normalize_tests(raw)
    except (ValueError, KeyError, TypeError):
        return None
    if spec["style"] != "assert" and not spec["cases"]:
        return None
    return json.dumps(spec)


DEEPCODER_SUBSETS = ("primeintellect", "taco", "lcbv5")


def load_deepcoder(local_path=None, subsets=DEEPCODER_SUBSETS, split: str = "train") -> Dataset:
    """agentica-org/DeepCoder-Preview-Dataset (FlowRL code training set): the given subsets, concatenated.

    Subsets: `primeintellect`, `taco`, `lcbv5` (train; lcbv5 also has test) and `codeforces` (test). Rows whose tests
    cannot be read are dropped with a warning. Columns: `prompt`, `tests`, `id`, `source`.
    """
    parts = []
    for subset in subsets:
        ds = load_split("agentica-org/DeepCoder-Preview-Dataset", split, config=subset, local_path=local_path)

        def convert(row, index, subset=subset):
            starter = row.get("starter_code") or None
            return {
                "prompt": code_prompt(row["problem"], starter),
                "tests": _normalized(row["tests"]),
                "id": f"{subset}/{row.get('uid') or index}",
                "source": f"deepcoder_{subset}",
            }

        ds = ds.map(convert, with_indices=True, remove_columns=ds.column_names)
        parts.append(_keep_valid(ds, f"DeepCoder/{subset}"))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_humanevalplus(local_path=None, split: str = "test") -> Dataset:
    """evalplus/humanevalplus (164 problems): the function stub as starter code, its test code as `assert` tests."""
    ds = load_split("evalplus/humanevalplus", split, local_path=local_path)

    def convert(row):
        prelude = "".join(line + "\n" for line in row["prompt"].splitlines() if line.startswith(("import ", "from ")))
        spec = {"style": "assert", "entry_point": row["entry_point"], "test": row["test"], "prelude": prelude}
        problem = (
            f"Complete the Python function `{row['entry_point']}` below so that it passes its hidden tests. "
            "Write the whole function, with its imports."
        )
        return {
            "prompt": code_prompt(problem, row["prompt"]),
            "tests": json.dumps(spec),
            "id": row["task_id"],
            "source": "humanevalplus",
        }

    return ds.map(convert, remove_columns=ds.column_names)


class _LiteralsOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset")


def decode_lcb_tests(value) -> list:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(JSON string))) as in `private_test_cases`.

    The pickle is read by an unpickler that refuses every class, so only plain strings, lists and dicts load.
    """
    if isinstance(value, list):
        return value
    if not value:
        return []
    try:
        return json.loads(value)
    except ValueError:
        pass
    decoded = _LiteralsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
    return json.loads(decoded) if isinstance(decoded, str | bytes) else decoded


def load_livecodebench(
    local_path=None,
    split: str = "test",
    config: str | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
) -> Dataset:
    """LiveCodeBench code generation, parquet mirror lighteval/code_generation_lite (the original repository needs a
    loading script that datasets>=4 refuses).

    `config`: a release subset of the mirror (e.g. `"v5"`), default the mirror's default. `start_date`/`end_date`
    (ISO `YYYY-MM-DD`, inclusive) keep problems by `contest_date`, to evaluate on a window after a model's cut-off.
    Public and private test cases are merged; functional (LeetCode) problems take their function name from `metadata`.
    Columns: `prompt`, `tests`, `id`, `source`, `platform`, `difficulty`, `contest_date`.
    """
    ds = load_split("lighteval/code_generation_lite", split, config=config, local_path=local_path)
    if start_date or end_date:
        lo, hi = start_date or "0000-00-00", end_date or "9999-99-99"
        ds = ds.filter(lambda date: lo <= str(date)[:10] <= hi, input_columns="contest_date")

    def convert(row):
        cases = decode_lcb_tests(row["public_test_cases"]) + decode_lcb_tests(row.get("private_test_cases"))
        metadata = _json_or(row.get("metadata"), {})
        for case in cases:
            if case.get("testtype") == "functional":
                case["metadata"] = metadata
        return {
            "prompt": code_prompt(row["question_content"], row.get("starter_code")),
            "tests": _normalized(cases),
            "id": str(row["question_id"]),
            "source": "livecodebench",
            "platform": str(row.get("platform", "")),
            "difficulty": str(row.get("difficulty", "")),
            "contest_date": str(row.get("contest_date", "")),
        }

    return _keep_valid(ds.map(convert, remove_columns=ds.column_names), "LiveCodeBench")
