"""Benchmarks, graders and `score_samples` on hand-made completions with known answers."""

import json
import math
import re
import time

import pytest
from datasets import Dataset, DatasetDict

from trl_flowrl.evaluation import (
    Benchmark,
    Grade,
    Sample,
    boxed_grader,
    load_benchmark,
    load_grader,
    metrics,
    reward_function_grader,
    score_samples,
)
from trl_flowrl.evaluation.benchmarks import prompt_text


def rows():
    return [
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "4", "id": "p0"},
        {"prompt": "What is 3+3?", "solution": "6", "id": "p1"},
    ]


def method_of(text, row):
    """The path id of these hand-made samples: the label before the first colon."""
    return text.split(":")[0] if ":" in text else None


SAMPLES = [
    ["A: 2+2 \\boxed{4}", "B: 2 plus 2 \\boxed{4}", "A: 2+2 \\boxed{4}", "\\boxed{5}"],
    ["A: \\boxed{7}", "no answer", "A: \\boxed{7}", "A: \\boxed{7}"],
]


def test_score_samples_on_hand_made_completions():
    benchmark = Benchmark("hand", rows(), boxed_grader(), path_id=method_of, description="two problems")
    result = score_samples(benchmark, SAMPLES)

    # problem 0: 3 of 4 correct (paths A, B, A; answers 4, 4, 4, 5); problem 1: none correct (answers 7, -, 7, 7)
    assert result["num_problems"] == 2 and result["num_samples"] == 4
    assert result["avg_at_k"] == pytest.approx((3 / 4 + 0) / 2)
    assert result["pass_at_k"] == {
        "1": pytest.approx(0.375),
        "2": pytest.approx((1 + 0) / 2),  # n - c = 1 < k = 2: every pair of problem 0 holds a correct sample
        "4": pytest.approx(0.5),
    }
    assert result["outcomes"] == {"correct": 3, "wrong": 4, "no_answer": 1}

    p0, p1 = result["problems"]
    assert (p0["id"], p0["num_correct"], p0["distinct_correct_paths"], p0["distinct_answers"]) == ("p0", 3, 2, 2)
    assert (p1["id"], p1["num_correct"], p1["distinct_correct_paths"], p1["distinct_answers"]) == ("p1", 0, 0, 1)
    entropy_abb = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert p0["correct_path_entropy"] == pytest.approx(entropy_abb)
    assert p1["correct_path_entropy"] is None
    assert p1["self_bleu"] == pytest.approx(metrics.self_bleu(SAMPLES[1]))
    assert p0["distinct_n"]["2"] == pytest.approx(metrics.distinct_n(SAMPLES[0], 2))

    d = result["diversity"]
    assert d["distinct_correct_paths"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert d["distinct_correct_paths_solved"] == pytest.approx(2.0)
    assert d["correct_path_entropy"] == pytest.approx(entropy_abb)
    assert d["distinct_answers"] == pytest.approx(1.5)
    assert d["self_bleu"] == pytest.approx((metrics.self_bleu(SAMPLES[0]) + metrics.self_bleu(SAMPLES[1])) / 2)
    assert d["distinct_4"] == pytest.approx(
        (metrics.distinct_n(SAMPLES[0], 4) + metrics.distinct_n(SAMPLES[1], 4)) / 2
    )
    assert "judge_score" not in d

    assert result["samples"][0][1] == {
        "problem": 0,
        "sample": 1,
        "text": "B: 2 plus 2 \\boxed{4}",
        "correct": True,
        "outcome": "correct",
        "answer": "4",
        "path_id": "B",
        "num_tokens": None,
        "finish_reason": None,
    }
    assert result["generation"]["truncated_fraction"] is None
    json.dumps(result)  # the whole entry is JSON-serialisable


def test_score_samples_without_path_identifier_or_answers():
    benchmark = Benchmark("plain", rows(), lambda text, row: row["solution"] in text)
    result = score_samples(benchmark, [["4", "four"], ["6", "6"]])
    assert result["avg_at_k"] == pytest.approx(0.75)
    assert result["outcomes"] == {"correct": 3, "wrong": 1}
    assert result["diversity"]["distinct_correct_paths"] is None
    assert result["diversity"]["distinct_answers"] is None  # the grader extracts no answers
    assert result["problems"][1]["self_bleu"] == pytest.approx(1.0)


def test_score_samples_generation_statistics():
    benchmark = Benchmark("plain", rows(), lambda text, row: True)
    samples = [
        [Sample("a", 3, "stop"), Sample("b", 8, "length")],
        [Sample("c", 1, "stop"), Sample("d", 8, "length")],
    ]
    result = score_samples(benchmark, samples)
    assert result["generation"]["mean_completion_tokens"] == pytest.approx(5.0)
    assert result["generation"]["truncated_fraction"] == pytest.approx(0.5)
    assert result["samples"][1][1]["finish_reason"] == "length"


def test_score_samples_rejects_ragged_or_mismatched_samples():
    benchmark = Benchmark("plain", rows(), lambda text, row: True)
    with pytest.raises(ValueError, match="same number"):
        score_samples(benchmark, [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="2 problems|has 2"):
        score_samples(benchmark, [["a"]])


def test_batched_grader_and_its_length_check():
    calls = []

    def grader(completions, rows):
        calls.append(len(completions))
        return [
            Grade(c == r["solution"], "correct" if c == r["solution"] else "wrong", c)
            for c, r in zip(completions, rows)
        ]

    benchmark = Benchmark("batched", rows(), grader, batched=True)
    assert [[g.correct for g in p] for p in benchmark.grade([["4", "5"], ["6", "6"]])] == [[True, False], [True, True]]
    assert calls == [4]  # one call for all completions
    short = Benchmark("short", rows(), lambda completions, rows: [True], batched=True)
    with pytest.raises(ValueError, match="returned 1 grades for 2"):
        short.grade([["a"], ["b"]])


def test_grade_coercion():
    assert Grade.coerce(True) == Grade(True, "correct")
    assert Grade.coerce(0) == Grade(False, "wrong")
    assert Grade.coerce(1.0) == Grade(True, "correct")
    assert Grade.coerce(Grade(False, "timeout")) == Grade(False, "timeout")
    with pytest.raises(TypeError, match="0/1"):
        Grade.coerce(0.5)
    with pytest.raises(TypeError):
        Grade.coerce("yes")


def test_benchmark_validation():
    with pytest.raises(ValueError, match="prompt"):
        Benchmark("x", [{"question": "q", "solution": "1"}], lambda t, r: True)
    with pytest.raises(ValueError, match="solution"):
        Benchmark("x", [{"prompt": "q"}], boxed_grader())  # the grader declares the columns it reads
    with pytest.raises(ValueError, match="no rows"):
        Benchmark("x", [], lambda t, r: True)
    with pytest.raises(ValueError, match="name"):
        Benchmark("has space", rows(), lambda t, r: True)
    assert len(Benchmark("x", rows(), lambda t, r: True).head(1)) == 1
    assert len(Benchmark("x", Dataset.from_list(rows()[:1] * 3), lambda t, r: True).head(None)) == 3


def test_boxed_grader():
    grade = boxed_grader()
    row = {"solution": "1000"}
    assert grade("so \\boxed{1,000}.", row) == Grade(True, "correct", "1,000")
    assert grade("\\boxed{999} then \\boxed{ 1000 }", row).correct  # the last box counts
    assert grade("\\boxed{0.5}", {"solution": "1/2"}).correct  # numbers compare by value
    assert grade("\\boxed{\\{1, 2\\}}", {"solution": "\\{1,2\\}"}).correct  # braces nest; whitespace ignored
    assert grade("\\boxed{\\frac12}", {"solution": "1/2"}) == Grade(False, "wrong", "\\frac12")  # no equivalence
    assert grade("the answer is 1000", row) == Grade(False, "no_answer", None)
    assert grade("\\boxed{100", row).outcome == "no_answer"  # unbalanced


def test_reward_function_grader_wraps_a_trl_reward_function():
    seen = {}

    def reward(prompts, completions, solution, id, **kwargs):
        seen.update(prompts=prompts, completions=completions, solution=solution, id=id, kwargs=sorted(kwargs))
        return [
            1.0 if c[0]["content"] == s else (None if c[0]["content"] == "?" else 0.2)
            for c, s in zip(completions, solution)
        ]

    benchmark = Benchmark("trl", rows()[:1], reward_function_grader(reward), batched=True)
    grades = benchmark.grade([["4", "5", "?"]])[0]
    assert grades == [Grade(True, "correct"), Grade(False, "wrong"), Grade(False, "unscored")]
    assert seen["completions"][0] == [{"role": "assistant", "content": "4"}]
    assert seen["solution"] == ["4", "4", "4"] and seen["id"] == ["p0"] * 3
    assert seen["kwargs"] == ["log_extra", "log_metric"]
    lenient = Benchmark("trl", rows()[:1], reward_function_grader(reward, threshold=0.1), batched=True)
    assert [g.correct for g in lenient.grade([["5"]])[0]] == [True]


def test_load_grader_by_name_and_by_import_path():
    grader, batched = load_grader("boxed")
    assert not batched and grader("\\boxed{4}", {"solution": "4"}).correct
    trl_grader, batched = load_grader("trl.rewards:accuracy_reward")
    assert batched
    benchmark = Benchmark("trl", rows()[:1], trl_grader, batched=True)
    assert [g.correct for g in benchmark.grade([["so \\boxed{4}", "so \\boxed{5}"]])[0]] == [True, False]
    with pytest.raises(ValueError, match="Cannot import"):
        load_grader("no_such_module_here:reward")
    with pytest.raises(ValueError, match="Unknown grader"):
        load_grader("mystery")


def test_load_benchmark_from_local_files(tmp_path):
    data = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "solution": str(i + 1)} for i in range(5)]
    jsonl = tmp_path / "my set.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    benchmark = load_benchmark(str(jsonl), grader="boxed", limit=3)
    assert benchmark.name == "my_set" and len(benchmark) == 3 and not benchmark.batched
    assert benchmark.prompts[2] == [{"role": "user", "content": "2+1?"}]
    assert benchmark.max_new_tokens == 8192
    assert benchmark.grade([["\\boxed{1}"], ["\\boxed{3}"], ["\\boxed{3}"]])[1][0].correct is False

    Dataset.from_list(data).to_parquet(str(tmp_path / "set.parquet"))
    assert len(load_benchmark(str(tmp_path / "set.parquet"), grader="boxed")) == 5

    DatasetDict({"test": Dataset.from_list(data[:2]), "train": Dataset.from_list(data)}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert len(load_benchmark(str(tmp_path / "saved"), grader="boxed")) == 2  # the test split

    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(ValueError, match="Cannot read"):
        load_benchmark(str(tmp_path / "bad.txt"), grader="boxed")
    no_solution = tmp_path / "no_solution.jsonl"
    no_solution.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(ValueError, match="solution"):
        load_benchmark(str(no_solution), grader="boxed")


def test_unknown_benchmark_name():
    with pytest.raises(ValueError, match="Unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k")


def test_prompt_text():
    assert prompt_text("plain") == "plain"
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 1+1?"}]
    assert prompt_text(conversation) == "What is 1+1?"
    assert prompt_text([{"role": "user", "content": [{"type": "text", "text": "multi"}]}]) == "multi"


# -- adapters to the other subpackages (`trl_flowrl.rewards`, `trl_flowrl.data`, `trl_flowrl.tasks`)


def test_builtin_math_benchmark_offline_says_how_to_get_the_data():
    from trl_flowrl.data import DatasetUnavailableError

    with pytest.raises(DatasetUnavailableError, match="huggingface-cli download HuggingFaceH4/MATH-500"):
        load_benchmark("math500")


def test_math_grader_adapter():
    grader, batched = load_grader("math", num_workers=1)
    benchmark = Benchmark("m", [{"prompt": "q", "solution": "\\frac{1}{2}"}], grader, batched=batched)
    grades = benchmark.grade([["so \\boxed{0.5}", "\\boxed{1/3}", "I give up"]])[0]
    assert [g.correct for g in grades] == [True, False, False]
    assert [g.outcome for g in grades] == ["correct", "wrong", "no_answer"]
    assert grades[0].answer == "0.5"


def test_code_grader_adapter():
    grader, batched = load_grader("code")
    tests = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    benchmark = Benchmark("c", [{"prompt": "add", "tests": json.dumps(tests)}], grader, batched=batched)
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    bad = "```python\nprint(0)\n```"
    grades = benchmark.grade([[good, bad, "no code"]])[0]
    assert [g.correct for g in grades] == [True, False, False]
    assert [g.outcome for g in grades] == ["passed", "failed", "no_code"]


def test_code_grader_runs_each_program_once_per_tests():
    from trl_flowrl.evaluation.benchmarks import code_grader
    from trl_flowrl.rewards.code_sandbox import LocalSandbox

    class Counting:
        """Runs programs in the local sandbox and records what it ran."""

        def __init__(self):
            self.sandbox, self.codes = LocalSandbox(), []

        def run(self, code, stdin="", files=None, fetch=(), timeout_s=None):
            self.codes.append(code)
            return self.sandbox.run(code, stdin=stdin, files=files, fetch=fetch, timeout_s=timeout_s)

    executor = Counting()
    grader = code_grader(executor=executor)
    add = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    double = json.dumps({"inputs": ["1 2\n"], "outputs": ["2\n"]})
    good = "a, b = map(int, input().split())\nprint(a + b)"
    block = f"```python\n{good}\n```"
    completions = [block, "Here it is:\n" + block, block, "```python\nprint(0)\n```", "no code", block]
    rows = [{"tests": add}] * 5 + [{"tests": double}]
    grades = grader(completions, rows)
    # the three copies against `add` (one with other prose) share one run; against other tests it runs again
    assert [g.outcome for g in grades] == ["passed", "passed", "passed", "failed", "no_code", "failed"]
    assert sorted(code.strip() for code in executor.codes) == sorted([good, "print(0)", good])


def test_arithmetic_benchmark_adapter():
    from trl_flowrl import tasks

    benchmark = load_benchmark("arithmetic", limit=3)
    assert benchmark.name == "arithmetic" and len(benchmark) == 3 and benchmark.max_new_tokens == 80
    row = benchmark.rows[0]
    problem = tasks.ArithmeticProblem(tuple(row["terms"]))
    paths = tasks.enumerate_paths(problem)
    texts = list(paths.values())[:2] + ["\\boxed{0}"]
    grades = benchmark.grade([texts, ["x"], ["x"]])
    assert [g.correct for g in grades[0]] == [True, True, False]
    ids = benchmark.path_ids([texts, ["x"], ["x"]])
    assert ids[0][:2] == list(paths)[:2] and ids[0][2] is None


def test_boxed_grader_is_linear_on_unclosed_boxes():
    # Scanning to the end from each `\boxed{` took 57 s for 56k characters, in the evaluating process.
    grade = boxed_grader()
    for text, answer in [("\\boxed{" * 30_000, None), ("\\boxed{7} " + "\\boxed{\\frac{1}{" * 13_000, "7")]:
        start = time.monotonic()
        assert grade(text, {"solution": "7"}).answer == answer
        assert time.monotonic() - start < 1.0
    assert grade("\\boxed{\\boxed{7}}", {"solution": "7"}).answer == "7"
    assert grade("\\boxed{a\\}", {"solution": "7"}).answer == "a\\"  # braces count even when escaped, as before


def test_missing_or_empty_local_dataset_says_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ["data/my_set.jsonl", "my_set.parquet", "./saved_set", str(tmp_path / "nowhere")]:
        with pytest.raises(FileNotFoundError, match=f"No dataset file or folder '{re.escape(missing)}'"):
            load_benchmark(missing)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="'empty.jsonl' is empty"):
        load_benchmark("empty.jsonl")
