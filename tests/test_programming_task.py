"""The built-in programming task: problems, splits, listed programs, sandboxed grading, and its held-out benchmark."""

import contextlib
import io
import json
import random

import pytest

from trl_flowrl.evaluation import load_benchmark, programs_benchmark, score_samples
from trl_flowrl.rewards import CodeReward, LocalSandbox, SandboxLimits, extract_code, normalize_tests
from trl_flowrl.rewards.code_reward import stdout_matches
from trl_flowrl.tasks import (
    NUM_CASES,
    ProgrammingProblem,
    enumerate_programs,
    program_id,
    programming_dataset,
    programming_problems_from_dataset,
    programming_sft_dataset,
)
from trl_flowrl.tasks.programming import (
    HELD_OUT_PERCENT,
    KINDS,
    WRONG_SHARE,
    all_problem_keys,
    enumerate_wrong_programs,
    format_completion,
    generate_problems,
    is_held_out,
    make_problem,
    pretraining_completion,
)


def completion(program: str):
    return [{"role": "assistant", "content": format_completion(program)}]


@pytest.fixture(scope="module")
def reward():
    return CodeReward(LocalSandbox(SandboxLimits(timeout_s=10), max_concurrency=2), timeout_per_test=10)


# ---------------------------------------------------------------------------------------------------------------
# Generation and splits


def test_generation_is_deterministic_per_seed():
    assert generate_problems(40, seed=3) == generate_problems(40, seed=3)
    assert generate_problems(20, seed=3, split="test") == generate_problems(20, seed=3, split="test")
    assert generate_problems(40, seed=3) != generate_problems(40, seed=4)
    assert programming_dataset(10, seed=1).to_list() == programming_dataset(10, seed=1).to_list()
    assert programming_sft_dataset(10, seed=1).to_list() == programming_sft_dataset(10, seed=1).to_list()


def test_problems_have_distinct_cases_with_reference_outputs():
    for problem in generate_problems(100, seed=0) + generate_problems(5, seed=0, num_cases=2):
        inputs = [stdin for stdin, _ in problem.cases]
        assert len(inputs) == len(set(inputs)) and len(inputs) in (NUM_CASES, 2)
        assert all(out == KINDS[problem.kind].solve(stdin, problem.param) for stdin, out in problem.cases)
    # Every parameter is two digits: the model has to copy both from the prompt.
    assert all(spec.params == tuple(range(10, 30)) for spec in KINDS.values())


def test_train_and_held_out_problems_are_disjoint():
    train = {p.key for seed in (0, 1) for p in generate_problems(300, seed=seed, unique=False)}
    test = {p.key for seed in (0, 1) for p in generate_problems(30, seed=seed, split="test")}
    assert train and test and not train & test
    assert len(all_problem_keys("train")) + len(all_problem_keys("test")) == len(all_problem_keys()) == 360
    assert len(all_problem_keys("test")) == 37 and HELD_OUT_PERCENT == 10
    sft = programming_problems_from_dataset(programming_sft_dataset(500, seed=0))
    assert not any(p.is_held_out for p in sft)
    assert not any(p.is_held_out for p in programming_problems_from_dataset(programming_dataset(323, seed=0)))
    # Every kind is trained on, and held-out problems are new parameters of trained kinds.
    assert {kind for kind, _ in all_problem_keys("train")} == set(KINDS)


def test_clear_errors():
    with pytest.raises(ValueError, match="unique"):
        generate_problems(38, split="test")
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="validation")
    with pytest.raises(ValueError, match="kind"):
        ProgrammingProblem("sort", 1, (("1\n", "1"),))
    with pytest.raises(ValueError, match="parameter"):
        ProgrammingProblem("int_times", 30, (("1\n", "30"),))
    with pytest.raises(ValueError, match="case"):
        ProgrammingProblem("int_times", 20, ())
    with pytest.raises(ValueError, match="num_cases"):
        make_problem("int_times", 20, random.Random(0), num_cases=0)
    with pytest.raises(ValueError, match="kind, param and tests"):
        programming_problems_from_dataset(programming_sft_dataset(2).remove_columns("kind"))


def test_dataset_columns_follow_trl_and_code_reward_conventions():
    dataset = programming_dataset(3, seed=0)
    row = dataset[0]
    problem = programming_problems_from_dataset(dataset)[0]
    assert row["prompt"] == [{"role": "user", "content": problem.question}]
    assert problem.question.startswith("Write a Python program that reads ")
    assert problem.question.endswith("Answer in a ```python block.")
    assert normalize_tests(row["tests"]) == problem.tests == json.loads(row["tests"])
    assert problem.tests["style"] == "stdio" and len(problem.tests["cases"]) == NUM_CASES
    assert programming_problems_from_dataset(dataset) == generate_problems(3, seed=0)
    sft = programming_sft_dataset(3, seed=0)
    assert sft[0]["completion"][0]["role"] == "assistant"
    assert sft[0]["completion"][0]["content"] in enumerate_programs(programming_problems_from_dataset(sft)[0]).values()


# ---------------------------------------------------------------------------------------------------------------
# Programs and grading


def run_in_process(code: str, stdin: str) -> str | None:
    """Our own listed programs are trusted: running them here checks every problem in about a second. None when the
    program raises (as `input()` past the end of stdin does)."""
    lines = iter(stdin.splitlines())

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {"input": read})
    except Exception:
        return None
    return out.getvalue()


def passes(text: str, problem) -> bool:
    outputs = [run_in_process(extract_code(text), stdin) for stdin, _ in problem.cases]
    return all(out is not None and stdout_matches(out, expected) for out, (_, expected) in zip(outputs, problem.cases))


def test_every_listed_program_passes_and_every_wrong_program_fails_on_every_problem():
    for seed in (0, 1):
        problems = generate_problems(323, seed=seed) + generate_problems(37, seed=seed, split="test")
        assert len({p.key for p in problems}) == 360
        for problem in problems:
            programs, wrong = enumerate_programs(problem), enumerate_wrong_programs(problem)
            assert len(programs) == len(KINDS[problem.kind].programs(problem.param)) >= 4, problem.key  # distinct
            assert len(wrong) == len(KINDS[problem.kind].wrong_programs(problem.param)) >= 2, problem.key
            assert not programs.keys() & wrong.keys()
            assert all(program_id(text) == pid for pid, text in (programs | wrong).items())
            for text in programs.values():
                assert passes(text, problem), (problem.key, text)
            for text in wrong.values():
                assert not passes(text, problem), (problem.key, text)


def test_some_wrong_programs_are_right_for_another_kind():
    # `input() * K` repeats a word and is wrong for an integer: the prompt, not the program's shape, decides.
    repeat, times = make_problem("word_repeat", 12, random.Random(0)), make_problem("int_times", 12, random.Random(0))
    assert program_id(format_completion("print(input() * 12)")) in enumerate_programs(repeat)
    assert program_id(format_completion("print(input() * 12)")) in enumerate_wrong_programs(times)
    largest, smallest = make_problem("max_plus", 20, random.Random(0)), make_problem("min_plus", 20, random.Random(0))
    assert enumerate_programs(smallest).keys() & enumerate_wrong_programs(largest).keys()


def test_pretraining_completions_mix_correct_and_wrong_programs():
    problems = generate_problems(400, seed=0, unique=False)
    rng = random.Random(0)
    drawn = [(p, pretraining_completion(p, rng)) for p in problems]
    wrong = [program_id(text) in enumerate_wrong_programs(p) for p, text in drawn]
    assert all(w or program_id(text) in enumerate_programs(p) for (p, text), w in zip(drawn, wrong))
    assert abs(sum(wrong) / len(wrong) - WRONG_SHARE) < 0.06 and WRONG_SHARE == 0.5
    again = random.Random(0)
    assert [pretraining_completion(p, again) for p in problems] == [text for _, text in drawn]


def test_listed_programs_pass_through_code_reward_and_wrong_programs_fail(reward):
    problems = [
        make_problem(kind, param, random.Random(0)) for kind, param in [("spread_times", 17), ("word_suffix", 25)]
    ]
    problems.append(make_problem("int_multiples", 13, random.Random(0), num_cases=2))
    completions, tests = [], []
    for problem in problems:
        for text in enumerate_programs(problem).values():
            completions.append([{"role": "assistant", "content": text}])
            tests.append(json.dumps(problem.tests))
    assert reward(completions, tests=tests) == [1.0] * len(completions)

    # the listed wrong programs (precedence, an off-by-one range, reading past the input, ...) in the real sandbox
    wrong = [(p, text) for p in problems for text in enumerate_wrong_programs(p).values()]
    wrong += [
        (problems[0], "a = list(map(int, input().split()))\nprint((max(a) - min(a)) * 18)"),  # another parameter
        (problems[0], "a = list(map(int, input().split()))\nprint((max(a) - min(a)) + 17)"),  # another kind
        (problems[1], "print(input() + '52')"),
    ]
    completions = [
        [{"role": "assistant", "content": t if t.startswith("```") else format_completion(t)}] for _, t in wrong
    ]
    assert reward(completions, tests=[json.dumps(p.tests) for p, _ in wrong]) == [0.0] * len(wrong)


def test_program_id_ignores_formatting_only():
    base = program_id(format_completion("print(sum(map(int, input().split())) + 7)"))
    assert base == "print(sum(map(int, input().split())) + 7)"
    assert program_id("Here:\n```python\nprint( sum(map(int,input().split()))+7 )  # sum\n```") == base
    assert program_id(completion("print((sum(map(int, input().split()))) + 7)")) == base  # redundant parentheses
    assert program_id(format_completion("print(7 + sum(map(int, input().split())))")) != base  # operand order
    assert program_id("print(1)") is None  # no fenced block
    assert program_id(format_completion("print(1")) is None  # does not parse
    assert program_id("```python\nprint(1)\n```\n```python\nprint(2)\n```") == "print(2)"  # the last block


def test_held_out_benchmark_grades_in_the_sandbox_and_counts_distinct_programs():
    assert len(load_benchmark("programs")) == 37  # by name: the whole held-out split
    with pytest.raises(ValueError, match="37 held-out problems"):
        programs_benchmark(38)
    benchmark = programs_benchmark(2, seed=0)
    assert benchmark.max_new_tokens == 128 and all(is_held_out(*key) for key in zip(benchmark.dataset["kind"], [
        int(p) if p.isdigit() else p for p in benchmark.dataset["param"]]))  # fmt: skip
    first, second = programming_problems_from_dataset(benchmark.dataset)
    a, b = list(enumerate_programs(first).values())[:2]
    respaced = a.replace("print(", "print( ").replace("```python\n", "```python\n# same program\n")
    (other,) = list(enumerate_programs(second).values())[:1]
    wrong = other.replace("print(", "print(1 + ", 1)
    scores = score_samples(benchmark, [[a, respaced, b, "no code here"], [wrong, wrong, other, other]])
    first_scores, second_scores = scores["problems"]
    assert [r["correct"] for r in scores["samples"][0]] == [True, True, True, False]
    assert [r["correct"] for r in scores["samples"][1]] == [False, False, True, True]
    assert first_scores["outcomes"] == {"passed": 3, "no_code": 1}
    assert first_scores["distinct_correct_paths"] == 2  # `a` written differently is still `a`
    assert second_scores["distinct_correct_paths"] == 1 and second_scores["outcomes"]["failed"] == 2
    assert scores["avg_at_k"] == 5 / 8
