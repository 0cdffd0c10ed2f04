"""The built-in arithmetic task: problems, splits, reasoning paths, grading, and exact path probabilities."""

import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_flowrl.rewards import MathAccuracyReward
from trl_flowrl.tasks import (
    ArithmeticProblem,
    arithmetic_dataset,
    arithmetic_sft_dataset,
    count_paths,
    embedded_model_path,
    enumerate_paths,
    generate_problems,
    is_held_out,
    path_id,
    path_log_probs,
    problems_from_dataset,
)


PROBLEM = ArithmeticProblem((12, 7, 30, 5))
WORKED = "12+7=19: 19+30+5\n30+5=35: 19+35\n19+35=54\n\\boxed{54}"


@pytest.fixture(scope="module")
def math_reward():
    """The reward the recipes train with: the task is graded as the real datasets are."""
    reward = MathAccuracyReward(num_workers=1)
    return lambda texts, solutions: reward([[{"role": "assistant", "content": t}] for t in texts], solution=solutions)


# ---------------------------------------------------------------------------------------------------------------
# Generation and splits


def test_generation_is_deterministic_per_seed():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3, split="test") == generate_problems(50, seed=3, split="test")
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)
    assert arithmetic_dataset(20, seed=1).to_list() == arithmetic_dataset(20, seed=1).to_list()
    assert arithmetic_sft_dataset(20, seed=1).to_list() == arithmetic_sft_dataset(20, seed=1).to_list()


def test_problems_respect_the_requested_shape():
    problems = generate_problems(100, seed=0, num_terms=3, max_value=9)
    assert all(len(p.terms) == 3 and all(1 <= t <= 9 for t in p.terms) for p in problems)
    assert len({tuple(sorted(p.terms)) for p in problems}) == 100  # unique up to reordering


def test_train_and_held_out_problems_are_disjoint():
    train = {tuple(sorted(p.terms)) for seed in (0, 1) for p in generate_problems(2000, seed=seed)}
    test = {tuple(sorted(p.terms)) for seed in (0, 1) for p in generate_problems(300, seed=seed, split="test")}
    assert train and test and not train & test
    assert all(is_held_out(t) for t in test) and not any(is_held_out(t) for t in train)
    # Held-out membership ignores the order of the terms, so a reordering cannot leak into training.
    assert all(is_held_out(t[::-1]) for t in test)
    sft = arithmetic_sft_dataset(500, seed=0)
    assert not any(is_held_out(p.terms) for p in problems_from_dataset(arithmetic_dataset(50, seed=0)))
    assert not any(is_held_out([int(t) for t in m[0]["content"][8:-1].split("+")]) for m in sft["prompt"])


def test_held_out_share_is_about_ten_percent():
    keys = [(a, b, c, d) for a in range(1, 11) for b in range(a, 11) for c in range(b, 11) for d in range(c, 11)]
    share = sum(map(is_held_out, keys)) / len(keys)
    assert 0.07 < share < 0.13


def test_too_many_unique_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="unique"):
        generate_problems(10, num_terms=2, max_value=2, split="test")
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="validation")
    with pytest.raises(ValueError, match="positive"):
        ArithmeticProblem((3, 0))


def test_dataset_columns_follow_trl_conventions(math_reward):
    row = arithmetic_dataset(3, seed=0)[0]
    assert row["prompt"] == [{"role": "user", "content": "What is " + "+".join(map(str, row["terms"])) + "?"}]
    assert row["solution"] == str(sum(row["terms"]))
    sft_row = arithmetic_sft_dataset(3, seed=0)[0]
    assert sft_row["completion"][0]["role"] == "assistant"
    assert math_reward([sft_row["completion"][0]["content"]], [sft_row["solution"]]) == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# Paths and grading


def test_worked_example_path_id():
    assert path_id(PROBLEM, WORKED) == "7+12|5+30|19+35"
    # Operand order inside a line, spacing and the order of the rewritten remainder do not change the path.
    assert path_id(PROBLEM, "7 + 12 = 19: 5+30+19\n5+30=35: 35+19\n35+19=54\n\\boxed{ 54 }") == "7+12|5+30|19+35"
    # The remainder may be left out; it is implied by the merges.
    assert path_id(PROBLEM, "12+7=19\n30+5=35\n19+35=54\n\\boxed{54}") == "7+12|5+30|19+35"


@pytest.mark.parametrize(
    "terms, expected",
    [((1, 2, 4, 8), 18), ((1, 2, 3), 3), ((3, 3, 3, 3), 2), ((5, 9), 1), ((12, 7, 30, 5), 17)],
)
def test_path_counts(terms, expected):
    # 4 distinct terms with distinct partial sums: 6 * 3 * 1 ordered merge histories. (3,3,3,3): 3+3 then either
    # 3+3 or 3+6. (12,7,30,5): 5+7=12 makes the two orders of merging a 12 with 30 the same path.
    assert count_paths(ArithmeticProblem(terms)) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_every_enumerated_path_is_graded_correct_and_has_its_own_id(seed, math_reward):
    texts, solutions = [], []
    for problem in generate_problems(20, seed=seed) + generate_problems(5, seed=seed, num_terms=3):
        paths = enumerate_paths(problem)
        ids = [path_id(problem, text) for text in paths.values()]
        assert ids == list(paths.keys())
        assert len(set(ids)) == len(ids)
        texts += paths.values()
        solutions += [problem.solution] * len(paths)
    assert math_reward(texts, solutions) == [1.0] * len(texts)


def test_wrong_answers_are_graded_wrong(math_reward):
    wrong = [
        WORKED.replace("\\boxed{54}", "\\boxed{55}"),
        "12+7=19: 19+30+5\n30+5=35: 19+35\n19+35=54",  # no final answer
        "\\boxed{fifty-four}",
    ]
    assert math_reward(wrong, ["54"] * len(wrong)) == [0.0] * len(wrong)
    assert path_id(PROBLEM, WORKED.replace("\\boxed{54}", "\\boxed{55}")) is None


@pytest.mark.parametrize(
    "completion",
    [
        "12+7=18: 18+30+5\n30+5=35: 18+35\n18+35=53\n\\boxed{54}",  # wrong sum in a step
        "12+8=20: 20+30+5\n30+5=35: 20+35\n20+35=54\n\\boxed{54}",  # merges a term that is not there
        "12+7=19: 19+30+6\n30+6=35: 19+35\n19+35=54\n\\boxed{54}",  # wrong remainder
        "12+7=19: 19+30+5\n19+30+5=54\n\\boxed{54}",  # three terms in one line
        "12+7=19: 19+30+5\n30+5=35: 19+35\n\\boxed{54}",  # stops before one term is left
        "12+7=19: 19+30+5\n30+5=35: 19+35\n19+35=54",  # no boxed answer
        "12+7=19: 19+30+5\n30+5=35: 19+35\n19+35=54\n\\boxed{54}\nmore",  # text after the answer
        "\\boxed{54}",
        "",
    ],
)
def test_invalid_derivations_have_no_path(completion):
    assert path_id(PROBLEM, completion) is None


# ---------------------------------------------------------------------------------------------------------------
# Exact path probabilities (the embedded model itself: tests/test_embedded_models.py)


@pytest.fixture(scope="module")
def embedded():
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_path_log_probs_cover_every_path(embedded):
    model, tokenizer = embedded
    problem = generate_problems(1, seed=0, split="test")[0]
    log_probs = path_log_probs(model, tokenizer, problem)
    assert list(log_probs) == list(enumerate_paths(problem))
    assert all(lp < 0 for lp in log_probs.values())
    assert sum(math.exp(lp) for lp in log_probs.values()) <= 1.0 + 1e-6
