"""Dataset loaders on small local fixtures shaped like the hub datasets, and the offline error."""

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
from datasets import Dataset

from trl_flowrl.data import (
    BOXED_INSTRUCTION,
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DATASETS,
    MATH_EVAL_DATASETS,
    DatasetUnavailableError,
    decode_lcb_tests,
    load_aime25,
    load_dapo_math,
    load_deepcoder,
    load_livecodebench,
    load_openr1_math,
    load_split,
    strip_dapo_template,
)
from trl_flowrl.rewards import CodeReward, LocalSandbox, MathVerifier, Outcome, SandboxLimits


FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def test_registry_names():
    assert set(DATASETS) == {
        "dapo_math",
        "openr1_math",
        "deepcoder",
        "math500",
        "aime24",
        "aime25",
        "amc23",
        "minerva",
        "olympiadbench",
        "humanevalplus",
        "livecodebench",
    }


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_offline_hub_error_names_the_dataset_and_the_fix(name):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest.py
    with pytest.raises(DatasetUnavailableError) as info:
        DATASETS[name]()
    message = str(info.value)
    assert "offline mode" in message and "huggingface-cli download" in message and "local_path=" in message
    repo = message.split("'")[1]
    assert "/" in repo and repo in message.split("download ")[1]


def test_missing_local_path_is_reported():
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_dapo_math(local_path="/nonexistent/dapo")


# -- math ------------------------------------------------------------------------------------------------------------


def test_dapo_math_keeps_its_template_and_deduplicates():
    ds = load_dapo_math(local_path=fixture("dapo_math"))
    assert len(ds) == 3  # the fixture repeats one problem, as the hub file does
    assert ds.column_names == ["prompt", "solution", "id", "source"]
    first = ds[0]
    assert first["prompt"] == [{"role": "user", "content": DAPO_PREFIX + "What is $2+3$?" + DAPO_SUFFIX}]
    assert first["solution"] == "5" and first["id"] == "a1" and first["source"] == "dapo_math"
    assert len(load_dapo_math(local_path=fixture("dapo_math"), deduplicate=False)) == 4
    boxed = load_dapo_math(local_path=fixture("dapo_math"), template="boxed")
    assert boxed[1]["prompt"][0]["content"] == "Compute $7 \\times 6$.\n" + BOXED_INSTRUCTION
    with pytest.raises(ValueError, match="template"):
        load_dapo_math(local_path=fixture("dapo_math"), template="chatml")
    assert strip_dapo_template("no template here") == "no template here"


def test_openr1_math_keeps_the_dataset_prompt():
    ds = load_openr1_math(local_path=fixture("openr1_math"))
    assert ds.column_names == ["prompt", "solution", "id", "source"]
    prompt = ds[1]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user"] and "\\boxed{}" in prompt[0]["content"]
    assert prompt[1]["content"] == "Simplify $\\frac{6}{8}$." and ds[1]["solution"] == "\\frac{3}{4}"
    no_system = load_openr1_math(local_path=fixture("openr1_math"), keep_system_prompt=False)
    assert no_system[0]["prompt"] == [{"role": "user", "content": "Solve $x^2=4$ for $x>0$.\n" + BOXED_INSTRUCTION}]


EXPECTED_EVAL = {
    "math500": ("\\left( 3, \\frac{\\pi}{2} \\right)", "test/precalculus/807.json", 2),
    "aime24": ("204", "60", 1),
    "aime25": ("70", "0", 1),
    "amc23": ("27", "0", 1),
    "minerva": ("0.49", "0", 1),
    "olympiadbench": ("2", "1606", 2),
}


@pytest.mark.parametrize("name", sorted(MATH_EVAL_DATASETS))
def test_math_eval_loaders(name):
    ds = MATH_EVAL_DATASETS[name](local_path=fixture(name))
    solution, identifier, rows = EXPECTED_EVAL[name]
    assert len(ds) == rows
    row = ds[0]
    assert row["solution"] == solution and row["id"] == identifier and row["source"] == name
    assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
    assert row["prompt"][0]["content"].endswith("\n" + BOXED_INSTRUCTION)
    if name == "math500":
        assert row["subject"] == "Precalculus" and int(row["level"]) == 2
    if name == "olympiadbench":
        assert ds[1]["solution"] == "-1, 1"  # a multiple answer is joined


def test_eval_answers_are_gradeable_by_the_math_reward():
    verifier = MathVerifier(parse_timeout=2, verify_timeout=2)
    completions, golds = [], []
    for name, loader in MATH_EVAL_DATASETS.items():
        for row in loader(local_path=fixture(name)):
            completions.append("... so the answer is \\boxed{" + row["solution"] + "}")
            golds.append(row["solution"])
    assert [g.outcome for g in verifier.grade(completions, golds)] == [Outcome.CORRECT] * len(golds)


def test_aime25_alternative_repository_and_file_list(tmp_path):
    # yentinglin/aime_2025 uses split "train"; a list of data files works for any loader.
    rows = [{"id": 1, "problem": "P", "answer": "12", "solution": "...", "url": "u", "year": 2025}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_aime25(local_path=[str(path)], repo_id="yentinglin/aime_2025")
    assert ds[0]["solution"] == "12" and ds[0]["id"] == "1"


def test_save_to_disk_copy(tmp_path):
    Dataset.from_list([{"problem": "1+1?", "answer": "2"}]).save_to_disk(str(tmp_path / "saved"))
    ds = DATASETS["minerva"](local_path=str(tmp_path / "saved"))
    assert ds[0]["solution"] == "2"
    assert len(load_split("any/name", "test", local_path=str(tmp_path / "saved"))) == 1


# -- code ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def code_reward():
    return CodeReward(LocalSandbox(SandboxLimits(timeout_s=10)), timeout_per_test=10)


def _answer(code: str) -> list[dict]:
    return [{"role": "assistant", "content": f"```python\n{code}\n```"}]


def test_deepcoder_subsets_and_their_test_formats(code_reward):
    ds = load_deepcoder(local_path=fixture("deepcoder"))
    assert set(ds.column_names) == {"tests", "prompt", "id", "source"}
    assert len(ds) == 4  # the primeintellect row with unreadable tests is dropped
    by_id = {row["id"]: row for row in ds}
    assert set(by_id) == {"primeintellect/pi-1", "taco/taco-1", "taco/taco-2", "lcbv5/lcb-1"}
    styles = {key: json.loads(row["tests"])["style"] for key, row in by_id.items()}
    assert styles == {
        "primeintellect/pi-1": "stdio",
        "taco/taco-1": "stdio",
        "taco/taco-2": "functional",
        "lcbv5/lcb-1": "functional",
    }
    assert "starter code" in by_id["lcbv5/lcb-1"]["prompt"][1]["content"]
    assert "stdin" in by_id["primeintellect/pi-1"]["prompt"][1]["content"]
    solutions = {
        "primeintellect/pi-1": "input()\nprint(sum(map(int, input().split())))",
        "taco/taco-1": "n = int(input())\nprint(n * n)",
        "taco/taco-2": "def double(x):\n    return 2 * x",
        "lcbv5/lcb-1": "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i",
    }
    keys = sorted(solutions)
    scores = code_reward([_answer(solutions[k]) for k in keys], tests=[by_id[k]["tests"] for k in keys])
    assert scores == [1.0] * len(keys)
    only_taco = load_deepcoder(local_path=fixture("deepcoder"), subsets=("taco",))
    assert len(only_taco) == 2


def test_humanevalplus_canonical_solution_passes(code_reward):
    ds = DATASETS["humanevalplus"](local_path=fixture("humanevalplus"))
    row = ds[0]
    assert row["id"] == "HumanEval/0" and "has_close_elements" in row["prompt"][1]["content"]
    raw = json.loads((FIXTURES / "humanevalplus" / "test.jsonl").read_text().splitlines()[0])
    canonical = raw["prompt"] + raw["canonical_solution"]
    wrong = raw["prompt"] + "    return False\n"
    assert code_reward([_answer(canonical), _answer(wrong)], tests=[row["tests"], row["tests"]]) == [1.0, 0.0]


def test_livecodebench_merges_public_and_private_tests(code_reward):
    ds = load_livecodebench(local_path=fixture("livecodebench"))
    assert len(ds) == 2
    stdin_row, functional_row = ds[0], ds[1]
    assert len(json.loads(stdin_row["tests"])["cases"]) == 3  # 1 public + 2 private
    functional = json.loads(functional_row["tests"])
    assert functional["fn_name"] == "maxElement" and len(functional["cases"]) == 2
    assert stdin_row["platform"] == "atcoder" and functional_row["difficulty"] == "easy"
    solutions = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "class Solution:\n    def maxElement(self, nums):\n        return max(nums)",
    ]
    assert code_reward([_answer(s) for s in solutions], tests=[stdin_row["tests"], functional_row["tests"]]) == [
        1.0,
        1.0,
    ]
    # Only the public case right is not enough.
    assert code_reward([_answer("print(3)")], tests=[stdin_row["tests"]]) == [0.0]
    recent = load_livecodebench(local_path=fixture("livecodebench"), start_date="2024-08-01")
    assert [row["id"] for row in recent] == ["abc999_a"]


def test_lcb_private_tests_refuse_pickled_objects():
    cases = [{"input": "1", "output": "1", "testtype": "stdin"}]
    encoded = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert decode_lcb_tests(encoded) == cases
    assert decode_lcb_tests(json.dumps(cases)) == cases and decode_lcb_tests("") == []

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    hostile = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_lcb_tests(hostile)
