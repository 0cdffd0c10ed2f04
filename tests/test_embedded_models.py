"""The embedded tiny models of the built-in tasks: shipped in the package, loadable, matched to their tokenizer and
chat template, reproducible by the pre-training script, and in the accuracy band that leaves RL something to do."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scripts.pretrain_tiny_model import TASK_DEFAULTS, PretrainArguments
from trl_flowrl.evaluation import arithmetic_benchmark, evaluate, named_models, programs_benchmark
from trl_flowrl.tasks import (
    EMBEDDED_MODELS,
    embedded_model_path,
    enumerate_paths,
    enumerate_programs,
    generate_problems,
    programming,
)


TASKS = {
    # task: (held-out problems, their valid completions, the held-out benchmark)
    "arithmetic": (
        lambda n: generate_problems(n, seed=0, split="test"),
        lambda problem: list(enumerate_paths(problem).values()),
        arithmetic_benchmark,
    ),
    "programs": (
        lambda n: programming.generate_problems(n, seed=0, split="test"),
        # the wrong programs too: a sampled one is a wrong construction, never a cut-off program
        lambda problem: [
            *enumerate_programs(problem).values(),
            *programming.enumerate_wrong_programs(problem).values(),
        ],
        programs_benchmark,
    ),
}


@pytest.fixture(scope="module", params=list(TASKS))
def embedded(request):
    path = embedded_model_path(request.param)
    return request.param, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("task", list(TASKS))
def test_shipped_in_the_package_as_small_safetensors(task):
    path = Path(embedded_model_path(task))
    assert path.name == EMBEDDED_MODELS[task] and path.parent.parent.name == "trl_flowrl"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    assert embedded_model_path() == embedded_model_path("arithmetic")
    with pytest.raises(ValueError, match="task"):
        embedded_model_path("chess")
    # the evaluation command's names for them
    assert named_models(f"embedded:{task}") == {f"embedded:{task}": str(path)}
    assert named_models("embedded") == {"embedded": embedded_model_path("arithmetic")}


@pytest.mark.parametrize("task", list(TASKS))
def test_pretraining_defaults_are_the_shipped_settings(task):
    # `python scripts/pretrain_tiny_model.py --task TASK` must reproduce the shipped model: its defaults are the
    # settings recorded beside the weights.
    path = Path(embedded_model_path(task))
    shipped = json.loads((path / "pretraining.json").read_text())["arguments"]
    config = json.loads((path / "config.json").read_text())
    resolved = vars(PretrainArguments(task=task))
    assert PretrainArguments().task == "arithmetic"
    assert set(TASK_DEFAULTS[task]) <= set(resolved)
    assert set(resolved) == set(shipped)  # the record names every setting, so none can drift unnoticed
    for name, value in shipped.items():
        if name != "output_dir":
            assert resolved[name] == value, name
    assert resolved["max_position_embeddings"] == config["max_position_embeddings"]
    assert resolved["num_layers"] == config["num_hidden_layers"] and resolved["hidden_size"] == config["hidden_size"]


def test_loads_and_its_tokenizer_round_trips_the_task(embedded):
    task, model, tokenizer = embedded
    problems, completions_of, _ = TASKS[task]
    assert model.config.model_type == "qwen2"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    for problem in problems(10):
        text = tokenizer.apply_chat_template(problem.prompt, tokenize=False, add_generation_prompt=True)
        assert text == f"<|im_start|>user\n{problem.question}<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text) - len("<|im_start|><|im_end|><|im_start|>") + 3  # one token per character
        for completion in completions_of(problem):
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(completion_ids + [tokenizer.eos_token_id], skip_special_tokens=True) == completion
            # the recipes' max_completion_length (64, 128) never cuts a valid completion and its end-of-sequence
            assert len(completion_ids) + 1 <= (64 if task == "arithmetic" else 128)


def test_leaves_room_for_rl_and_samples_several_paths(embedded):
    # The targets for a shipped model, at TRL's sampling temperature, measured as the recipes measure them
    # (answers graded by the math reward, programs run in the sandbox): held-out accuracy between 20% and 60%, and
    # more than one distinct correct path (or program) per problem among 8 samples.
    task, model, tokenizer = embedded
    benchmark = TASKS[task][2](16)
    results = evaluate(
        {"tiny": model}, benchmark, num_samples=8, temperature=1.0, top_p=1.0, tokenizer=tokenizer,
        backend="transformers", plots=False, progress=False,
    )  # fmt: skip
    scores = results["models"]["tiny"]["benchmarks"][benchmark.name]
    assert 0.2 <= scores["avg_at_k"] <= 0.6
    assert scores["diversity"]["distinct_correct_paths"] > 1.0
    assert "infra_error" not in scores["outcomes"]  # the sandbox ran every program
    valid = sum(r["path_id"] is not None for problem in scores["samples"] for r in problem)
    assert valid / (16 * 8) > 0.1  # it writes the task's derivations or programs, not just answers


def test_the_programs_model_copies_the_constant_and_errs_in_construction():
    # What leaves RL something a 1/0 reward can fix within the recipe's run: on held-out problems the model copies the
    # problem's constant and writes one of the listed programs, correct or wrong (a wrong construction, not a
    # mistyped constant), about half of the time a wrong one.
    path = embedded_model_path("programs")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    problems = programming.generate_problems(16, seed=0, split="test")
    texts = [tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True) for p in problems]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, top_p=1.0, num_return_sequences=8)
    completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = wrong = 0
    for i, completion in enumerate(completions):
        problem, program = problems[i // 8], programming.program_id(completion)
        correct += program in enumerate_programs(problem)
        wrong += program in programming.enumerate_wrong_programs(problem)
    assert (correct + wrong) / len(completions) >= 0.9
    assert 0.3 <= wrong / len(completions) <= 0.7
