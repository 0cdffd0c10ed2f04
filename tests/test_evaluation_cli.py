"""The evaluation command and API end to end on the tiny model, offline; the report and the merge of runs."""

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from datasets import Dataset

from trl_flowrl.evaluation import Benchmark, Grade, evaluate, evaluator, markdown_report, merge_results
from trl_flowrl.evaluation.cli import main
from trl_flowrl.evaluation.generation import TransformersGenerator, render_prompts
from trl_flowrl.evaluation.report import plot_pass_at_k


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local_dataset(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
    ]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_command_end_to_end_two_models(tiny_model_path, local_dataset, tmp_path):
    out = tmp_path / "report"
    command = [
        sys.executable, "-m", "trl_flowrl.evaluation",
        "--model", tiny_model_path, "--model", f"second={tiny_model_path}",
        "--benchmarks", local_dataset, "--grader", "boxed",
        "--num-samples", "4", "--max-new-tokens", "8", "--limit", "3",
        "--backend", "transformers", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | sums |" in done.stdout  # the markdown table is printed
    assert "sample/s" in done.stderr or "sample" in done.stderr  # the progress bar

    results = json.loads((out / "results.json").read_text())
    first = os.path.basename(tiny_model_path)
    assert list(results["models"]) == [first, "second"]
    for label, entry in results["models"].items():
        assert entry["model"] == tiny_model_path
        assert entry["settings"] == {
            "backend": "transformers", "num_samples": 4, "temperature": 0.6, "top_p": 0.95,
            "seed": 0, "batch_size": 64, "limit": 3,
        }  # fmt: skip
        bench = entry["benchmarks"]["sums"]
        assert bench["num_problems"] == 3 and bench["num_samples"] == 4 and bench["max_new_tokens"] == 8
        assert list(bench["pass_at_k"]) == ["1", "2", "4"]
        records = [json.loads(line) for line in (out / bench["samples_file"]).read_text().splitlines()]
        assert len(records) == 12 and all(r["num_tokens"] <= 8 for r in records)
        assert bench["avg_at_k"] == pytest.approx(sum(r["correct"] for r in records) / 12)
        assert bench["samples_file"] == f"samples/{label}/sums.jsonl"
    # same checkpoint, same seed: the same samples
    a, b = (results["models"][m]["benchmarks"]["sums"]["samples_file"] for m in results["models"])
    assert (out / a).read_text() == (out / b).read_text()

    assert "## avg@k" in (out / "results.md").read_text()
    for plot in ("pass_at_k.png", "accuracy_vs_diversity.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_with_a_model_instance_and_an_in_test_benchmark(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{i}*2="}], "solution": str(2 * i)} for i in range(3)]
    )

    def even_length(text, row):  # a grader whose verdict can be recomputed from the returned samples
        return Grade(len(text) % 2 == 0, "even" if len(text) % 2 == 0 else "odd", text[:1] or None)

    benchmark = Benchmark("parity", prompts, even_length, path_id=lambda text, row: text[:1] or None, max_new_tokens=5)
    results = evaluate(
        {"tiny": model}, [benchmark], num_samples=4, temperature=1.0, top_p=1.0, tokenizer=tokenizer, progress=False
    )
    bench = results["models"]["tiny"]["benchmarks"]["parity"]
    samples = bench["samples"]  # no output_dir: the samples stay in the result
    correct = [[len(s["text"]) % 2 == 0 for s in problem] for problem in samples]
    assert bench["max_new_tokens"] == 5
    assert bench["avg_at_k"] == pytest.approx(sum(map(sum, correct)) / 12)
    assert bench["pass_at_k"]["4"] == pytest.approx(sum(map(any, correct)) / 3)
    assert sum(bench["outcomes"].values()) == 12
    for problem, entry in zip(samples, bench["problems"]):
        firsts = {s["text"][:1] for s in problem if len(s["text"]) % 2 == 0 and s["text"]}
        assert entry["distinct_correct_paths"] == len(firsts)
    assert results["models"]["tiny"]["model"] == os.path.basename(tiny_model_path)
    json.dumps(results)


def test_evaluate_validates_its_inputs(tiny_model_path):
    benchmark = Benchmark("b", [{"prompt": "q"}], lambda t, r: True)
    with pytest.raises(ValueError, match="unique"):
        evaluate(tiny_model_path, [benchmark, benchmark])
    with pytest.raises(ValueError, match="Unknown benchmark"):
        evaluate(tiny_model_path, "nonexistent_set")


def fake_results(label, avg, paths, k=4, temperature=0.6):
    bench = {
        "num_samples": k,
        "avg_at_k": avg,
        "pass_at_k": {"1": avg, "2": min(1.0, 1.5 * avg), "4": min(1.0, 2 * avg)},
        "diversity": {"distinct_correct_paths": paths, "self_bleu": 0.5, "distinct_2": 0.25, "distinct_4": 0.5},
        "generation": {"truncated_fraction": 0.0},
    }
    other = dict(bench, diversity={"self_bleu": 0.75}, generation={"truncated_fraction": None})
    return {
        "format": "trl-flowrl-evaluation/1",
        "models": {
            label: {
                "model": f"runs/{label}",
                "settings": {"num_samples": k, "temperature": temperature, "top_p": 0.95},
                "benchmarks": {"arith": bench, "other": other},
            }
        },
    }


def test_markdown_report_tables():
    results = merge_results([fake_results("grpo", 0.5, 1.25), fake_results("flowrl", 0.25, 2.5)])
    text = markdown_report(results)
    assert "Sampling: k = 4, temperature 0.6, top_p 0.95." in text
    assert "| model | arith | other | mean |" in text
    assert "| grpo | 50.00 | 50.00 | 50.00 |" in text  # avg@k
    assert "| flowrl | 50.00 | 50.00 | 50.00 |" in text  # pass@4 = 2 * 0.25
    assert "| arith | flowrl | 2.50 | - | - | 0.250 | 0.500 | 0.500 | - | 0.00 |" in text
    assert "| other | grpo | - | - | - | - | - | 0.750 | - | - |" in text


def test_report_flags_mixed_sampling_settings():
    results = merge_results([fake_results("a", 0.5, 1.0), fake_results("b", 0.5, 1.0, temperature=1.0)])
    assert "different settings" in markdown_report(results)


def test_merge_keeps_every_model_and_makes_labels_unique():
    merged = merge_results([fake_results("m", 0.5, 1.0), fake_results("m", 0.25, 2.0)], sources=["x", "y"])
    assert list(merged["models"]) == ["m", "m-2"]
    assert merged["models"]["m-2"]["benchmarks"]["arith"]["avg_at_k"] == 0.25
    assert merged["models"]["m-2"]["source"] == "y"
    with pytest.raises(ValueError):
        merge_results([])


def test_merge_command(tmp_path, capsys):
    for label, avg in (("grpo", 0.5), ("flowrl", 0.75)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "results.json").write_text(json.dumps(fake_results(label, avg, 1.0)))
    out = tmp_path / "merged"
    assert (
        main(["--merge", str(tmp_path / "grpo"), str(tmp_path / "flowrl" / "results.json"), "--output-dir", str(out)])
        == 0
    )
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["models"]) == ["grpo", "flowrl"]
    assert "| flowrl | 75.00 | 75.00 | 75.00 |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_diversity.png").stat().st_size > 0
    assert "| grpo |" in capsys.readouterr().out


def test_command_argument_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--benchmarks", "arithmetic"])
    assert "--model and --benchmarks are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--benchmarks", "b", "--judge-model", "judge"])
    assert "--judge-base-url" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "math500" in capsys.readouterr().out


def test_command_with_a_wrong_model_path_says_so(local_dataset, tmp_path):
    # It said "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    for model in [str(tmp_path / "no" / "such" / "model"), "runs/x/checkpoint-1"]:
        with pytest.raises(FileNotFoundError, match="does not exist.*give a checkpoint directory"):
            main(["--model", model, "--benchmarks", local_dataset, "--backend", "transformers", "--no-plots"])
    assert not (tmp_path / "outputs").exists()


def test_plots_say_how_to_install_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'trl-flowrl\[plots\]'"):
        plot_pass_at_k(fake_results("m", 0.5, 1.0), str(tmp_path / "x.png"))


def test_embedded_task_end_to_end(tmp_path):
    """The embedded model on the embedded task, offline."""
    results = evaluate(
        "embedded", "arithmetic", num_samples=4, temperature=1.0, top_p=1.0, limit=8, output_dir=str(tmp_path),
        progress=False,
    )  # fmt: skip
    bench = next(iter(results["models"].values()))["benchmarks"]["arithmetic"]
    assert bench["num_problems"] == 8 and bench["max_new_tokens"] == 80
    records = [json.loads(line) for line in (tmp_path / bench["samples_file"]).read_text().splitlines()]
    assert len(records) == 32
    assert all(r["correct"] for r in records if r["path_id"] is not None)  # a valid path is a correct answer
    for index, problem in enumerate(bench["problems"]):
        paths = {r["path_id"] for r in records if r["problem"] == index and r["correct"] and r["path_id"]}
        assert problem["distinct_correct_paths"] == len(paths)
    assert bench["avg_at_k"] == pytest.approx(sum(r["correct"] for r in records) / 32)
    assert (tmp_path / "pass_at_k.png").exists()


# -- wrong inputs are named, and graded work is never lost --------------------------------------------------------


@pytest.fixture
def no_model_loaded(monkeypatch):
    """Input errors must come before any model is loaded (or any sample generated)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluator, "load_generator", refuse)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-new-tokens", "0", "must be >= 1, got 0"),  # was taken as unset: 80 tokens
        ("--num-samples", "100000000", "must be in [1, 65536], got 100000000"),  # allocated 1.5 GB first
        ("--num-samples", "0", "must be in [1, 65536], got 0"),
        ("--top-p", "0", "must be in (0.0, 1.0], got 0"),
        ("--temperature", "-1", "must be in [0.0, inf], got -1"),
        ("--batch-size", "0", "must be >= 1, got 0"),
        ("--limit", "x", "expected an integer, got 'x'"),
    ],
)
def test_command_names_a_wrong_sampling_option(option, value, message, no_model_loaded, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", "embedded", "--benchmarks", "arithmetic", option, value])
    assert exit.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_evaluate_checks_the_sampling_options_first(no_model_loaded):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        evaluate("embedded", "arithmetic", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"num_samples must be in \[1, 65536\], got 100000000"):
        evaluate("embedded", "arithmetic", num_samples=100_000_000)


def test_generation_memory_follows_the_samples_generated(tiny_model_path):
    """k copies of each prompt are drawn as they are generated: nothing of size P * k before the first sample."""
    generator = TransformersGenerator(tiny_model_path, batch_size=4)

    class FirstBatch(Exception):
        pass

    def first_batch(**kwargs):
        raise FirstBatch(tuple(kwargs["input_ids"].shape))

    generator.model.generate = first_batch
    tracemalloc.start()
    try:
        with pytest.raises(FirstBatch) as reached:
            generator.generate(["1+1=", "22+22="], num_samples=65536, temperature=1.0, top_p=1.0, max_new_tokens=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reached.value.args[0][0] == 4  # one batch of the shorter prompt's copies
    assert peak < 1_000_000, peak  # bytes; a list of P * k = 131072 entries alone is over 1 MB


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (["1+1=", ""], "row 1 (counting from 0, id 'p1'): the prompt is a blank string ('')"),  # was an IndexError
        ([3, 7], "row 0 (counting from 0, id 'p0'): the prompt is int 3, not a string or a list of"),  # TypeError
        (  # was a jinja UndefinedError
            [[{"role": "user", "content": "1+1="}], [{"role": "system"}, {"role": "user", "content": "2+2="}]],
            "row 1 (counting from 0, id 'p1'): message 0 of the prompt has no `content` (it has ['role'])",
        ),
        ([[{"role": "user", "content": "1+1="}], []], "row 1 (counting from 0, id 'p1'): the prompt is an empty list"),
    ],
)
def test_command_names_the_row_of_a_prompt_it_cannot_generate_from(prompts, message, tmp_path, no_model_loaded):
    path = _jsonl(
        tmp_path / "bad.jsonl", [{"id": f"p{i}", "prompt": p, "solution": "2"} for i, p in enumerate(prompts)]
    )
    with pytest.raises(ValueError) as error:
        main(["--model", "embedded", "--benchmarks", path, "--output-dir", str(tmp_path / "out"), "--no-plots"])
    assert str(error.value).startswith(f"Benchmark 'bad' (local dataset {path}), ")
    assert message in str(error.value) and str(error.value).endswith("Fix or remove that row.")


def test_generators_name_the_prompt_they_cannot_generate_from(tiny_model_path, no_model_loaded):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    user = {"role": "user", "content": "1+1="}
    for prompts, message in [
        (["ok", "  "], "Prompt 1 cannot be generated from: the prompt is a blank string ('  ')."),
        ([[user, "hello"]], "Prompt 0 cannot be generated from: message 1 of the prompt is str 'hello', not a dict."),
        ([[{"role": "user", "content": 5}]], "message 0 of the prompt has a `content` of type int."),
        ([None], "Prompt 0 cannot be generated from: the prompt is NoneType None"),
    ]:
        with pytest.raises(ValueError) as error:
            render_prompts(tokenizer, prompts)
        assert message in str(error.value)
    rows = [{"prompt": "ok"}, {"prompt": [user, {"role": None, "content": "x"}]}]
    with pytest.raises(
        ValueError, match=r"'in-memory', row 1 \(counting from 0\): message 1 of the prompt has no `role`"
    ):
        evaluate("embedded", [Benchmark("in-memory", rows, lambda text, row: True)])


def test_graded_results_survive_files_that_cannot_be_written(tiny_model_path, local_dataset, tmp_path, capsys):
    args = ["--model", tiny_model_path, "--benchmarks", local_dataset, "--grader", "boxed", "--num-samples", "2"]
    args += ["--max-new-tokens", "4", "--limit", "2", "--backend", "transformers", "--no-plots", "--no-progress"]

    # The samples folder cannot be made (a file holds its name): the samples go into results.json instead.
    out = tmp_path / "samples-blocked"
    out.mkdir()
    (out / "samples").write_text("a file where the samples folder goes\n")
    assert main([*args, "--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| model | sums |" in captured.out  # the report is printed
    assert "Could not write, in" in captured.err and "samples/" in captured.err
    assert "The report above is the graded result." in captured.err
    bench = next(iter(json.loads((out / "results.json").read_text())["models"].values()))["benchmarks"]["sums"]
    assert "samples_file" not in bench and "samples/" in bench["samples_error"]
    correct = [[r["correct"] for r in problem] for problem in bench["samples"]]
    assert [len(c) for c in correct] == [2, 2]
    assert bench["avg_at_k"] == pytest.approx(sum(map(sum, correct)) / 4)
    assert "## avg@k" in (out / "results.md").read_text()

    # results.json cannot be written (a folder holds its name): the samples are, and the report is printed.
    out = tmp_path / "results-blocked"
    (out / "results.json").mkdir(parents=True)
    assert main([*args, "--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| model | sums |" in captured.out and "results.json" in captured.err
    records = (out / "samples" / os.path.basename(tiny_model_path) / "sums.jsonl").read_text().splitlines()
    assert len(records) == 4
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples"]  # no results.json.tmp left


def test_merge_names_a_file_that_is_not_an_evaluation_result(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(fake_results("grpo", 0.5, 1.0)))
    bad = {
        "list.json": b"[1, 2]",  # was an AttributeError
        "broken.json": b'{"models": ',
        "latin1.json": '{"caf\u00e9": 1}'.encode("latin-1"),
        "models-list.json": b'{"models": [1]}',
        "no-benchmarks.json": b'{"models": {"m": {"model": "x"}}}',
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    for name in [*bad, "missing.json"]:
        with pytest.raises(SystemExit) as exit:
            main(["--merge", str(good), str(tmp_path / name), "--output-dir", str(tmp_path / "out")])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"--merge: cannot read {tmp_path / name}" in err or f"--merge: {tmp_path / name} is not the" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="Run 1 is not an evaluation result .*: it is a list"):
        merge_results([fake_results("a", 0.5, 1.0), [1, 2]])
