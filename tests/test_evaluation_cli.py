"""The evaluation command and API end to end on the tiny model, offline; the report and the merge of runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from trl_flowrl.evaluation import Benchmark, Grade, evaluate, markdown_report, merge_results
from trl_flowrl.evaluation.cli import main
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
