r"""Math prompt datasets for TRL: a conversational `prompt`, the gold answer in `solution`, and metadata.

Prompt templates (the wording the papers' recipes use):
- `"dapo"`: DAPO-Math-17k's own template, which asks for the answer on a last line `Answer: ...` (FlowRL math trains
  on it). `MathAccuracyReward` reads that line.
- `"boxed"`: the problem followed by "Please reason step by step, and put your final answer within \boxed{}." (the
  Qwen2.5-Math evaluation prompt, used for the evaluation sets).
- OpenR1-Math-46k-8192 (ExGRPO, from LUFFY) ships its own prompt: a system message asking for `<think>` reasoning and
  a `\boxed{}` answer, then the problem; it is kept as it is unless `keep_system_prompt=False`.

Every loader takes `local_path` (a downloaded copy) and raises `DatasetUnavailableError` with download instructions
when the hub cannot be reached.
"""

from __future__ import annotations

import json

from datasets import Dataset, Features, Value

from .hub import load_split


DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("dapo", "boxed")
PROMPT_FEATURE = [{"role": Value("string"), "content": Value("string")}]
MATH_FEATURES = {
    "prompt": PROMPT_FEATURE,
    "solution": Value("string"),
    "id": Value("string"),
    "source": Value("string"),
}


def apply_template(problem: str, template: str = "boxed") -> list[dict[str, str]]:
    """A one-turn conversational prompt for `problem` with the `"dapo"` or `"boxed"` template."""
    if template == "dapo":
        content = DAPO_PREFIX + problem.strip() + DAPO_SUFFIX
    elif template == "boxed":
        content = problem.strip() + "\n" + BOXED_INSTRUCTION
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")
    return [{"role": "user", "content": content}]


def strip_dapo_template(content: str) -> str:
    """The bare problem of a DAPO-Math-17k prompt (the text between its template's prefix and suffix)."""
    if content.startswith(DAPO_PREFIX):
        content = content[len(DAPO_PREFIX) :]
    if content.endswith(DAPO_SUFFIX):
        content = content[: -len(DAPO_SUFFIX)]
    return content.strip()


def _messages(value) -> list[dict[str, str]]:
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else [{"role": "user", "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _struct(value) -> dict:
    if isinstance(value, str):
        return json.loads(value)
    return dict(value or {})


def load_dapo_math(local_path=None, split: str = "train", template: str = "dapo", deduplicate: bool = True) -> Dataset:
    """BytedTsinghua-SIA/DAPO-Math-17k (FlowRL math training set).

    The hub file repeats each of its ~17k problems many times (about 1.79M rows); `deduplicate=True` keeps the first
    row of each problem. Columns: `prompt`, `solution` (`reward_model.ground_truth`), `id`, `source`.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")
    ds = load_split("BytedTsinghua-SIA/DAPO-Math-17k", split, local_path=local_path)

    def convert(row):
        problem = strip_dapo_template(_messages(row["prompt"])[-1]["content"])
        return {
            "prompt": apply_template(problem, template),
            "solution": str(_struct(row["reward_model"])["ground_truth"]),
            "id": str(_struct(row.get("extra_info")).get("index", "")),
            "source": "dapo_math",
            "problem": problem,
        }

    features = Features({**MATH_FEATURES, "problem": Value("string")})
    ds = ds.map(convert, remove_columns=ds.column_names, features=features)
    if deduplicate:
        seen: set[str] = set()

        def first_time(problem):
            if problem in seen:
                return False
            seen.add(problem)
            return True

        ds = ds.filter(first_time, input_columns="problem")
    return ds.remove_columns("problem")


def load_openr1_math(local_path=None, split: str = "train", keep_system_prompt: bool = True) -> Dataset:
    r"""Elliott/Openr1-Math-46k-8192 (ExGRPO training set; LUFFY's OpenR1-Math subset).

    The dataset's `prompt` (a system message asking for `<think>` reasoning and a `\boxed{}` answer, then the problem)
    is kept; with `keep_system_prompt=False` the system message is dropped and the boxed instruction appended to the
    problem instead. Columns: `prompt`, `solution` (`reward_model.ground_truth`), `id`, `source`. The R1 reference
    trace (`target`) is dropped: ExGRPO trains on the questions only.
    """
    ds = load_split("Elliott/Openr1-Math-46k-8192", split, local_path=local_path)

    def convert(row):
        messages = _messages(row["prompt"])
        if not keep_system_prompt:
            messages = [m for m in messages if m["role"] != "system"]
            if "\\boxed" not in messages[-1]["content"]:
                messages[-1]["content"] = messages[-1]["content"].strip() + "\n" + BOXED_INSTRUCTION
        extra = _struct(row.get("extra_info"))
        return {
            "prompt": messages,
            "solution": str(_struct(row["reward_model"])["ground_truth"]),
            "id": str(extra.get("index", "")),
            "source": "openr1_math",
        }

    return ds.map(convert, remove_columns=ds.column_names, features=Features(MATH_FEATURES))


def _first_present(row: dict, names: tuple[str, ...], what: str, repo_id: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise KeyError(f"{repo_id}: none of the {what} columns {names} is present (columns: {sorted(row)}).")


def _answer_text(value) -> str:
    if isinstance(value, list):  # OlympiadBench: a list of final answers
        value = ", ".join(str(v).strip().strip("$") for v in value)
    if isinstance(value, float) and value.is_integer():  # AMC23 stores answers as floats
        value = int(value)
    return str(value).strip()


def _load_math_eval(
    repo_id: str,
    split: str,
    source: str,
    local_path,
    template: str,
    keep: tuple[str, ...] = (),
    answer_columns: tuple[str, ...] = ("answer",),
) -> Dataset:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")
    ds = load_split(repo_id, split, local_path=local_path)

    def convert(row, index):
        problem = _first_present(row, ("problem", "question", "Problem", "Question"), "problem", repo_id)
        answer = _first_present(row, answer_columns, "answer", repo_id)
        identifier = next((row[k] for k in ("unique_id", "id", "ID", "idx") if row.get(k) is not None), index)
        return {
            "prompt": apply_template(str(problem), template),
            "solution": _answer_text(answer),
            "id": str(identifier),
            "source": source,
            **{k: row[k] for k in keep if k in row},
        }

    # Explicit features: a hub column of the same name (an integer `id`) must not impose its type.
    features = Features({**MATH_FEATURES, **{k: ds.features[k] for k in keep if k in ds.features}})
    return ds.map(convert, with_indices=True, remove_columns=ds.column_names, features=features)


def load_math500(local_path=None, split: str = "test", template: str = "boxed") -> Dataset:
    """HuggingFaceH4/MATH-500. Keeps `subject` and `level`."""
    return _load_math_eval("HuggingFaceH4/MATH-500", split, "math500", local_path, template, keep=("subject", "level"))


def load_aime24(local_path=None, split: str = "train", template: str = "boxed") -> Dataset:
    """AIME 2024 (HuggingFaceH4/aime_2024, 30 problems)."""
    return _load_math_eval("HuggingFaceH4/aime_2024", split, "aime24", local_path, template)


def load_aime25(
    local_path=None, split: str | None = None, template: str = "boxed", repo_id: str = "math-ai/aime25"
) -> Dataset:
    """AIME 2025 (math-ai/aime25, split `test`; or `repo_id="yentinglin/aime_2025"`, split `train`)."""
    split = split or ("train" if repo_id == "yentinglin/aime_2025" else "test")
    return _load_math_eval(repo_id, split, "aime25", local_path, template)


def load_amc23(local_path=None, split: str = "test", template: str = "boxed") -> Dataset:
    """AMC 2023 (math-ai/amc23, 40 problems)."""
    return _load_math_eval("math-ai/amc23", split, "amc23", local_path, template)


def load_minerva(local_path=None, split: str = "test", template: str = "boxed") -> Dataset:
    """Minerva math (math-ai/minervamath)."""
    return _load_math_eval("math-ai/minervamath", split, "minerva", local_path, template)


def load_olympiadbench(local_path=None, split: str = "test", template: str = "boxed") -> Dataset:
    """OlympiadBench, English text-only math subset (math-ai/olympiadbench). A list of final answers is joined."""
    return _load_math_eval(
        "math-ai/olympiadbench",
        split,
        "olympiadbench",
        local_path,
        template,
        answer_columns=("final_answer", "answer"),
    )
