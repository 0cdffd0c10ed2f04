"""Sampling k completions per prompt: the transformers backend on the tiny model, the vLLM backend on a fake vLLM."""

import importlib.machinery
import re
import sys
import types

import pytest
from transformers import AutoTokenizer

from trl_flowrl.evaluation import load_generator
from trl_flowrl.evaluation.generation import Sample, TransformersGenerator, VLLMGenerator, render_prompts


PROMPTS = [
    [{"role": "user", "content": "What is 13+24+5?"}],
    [{"role": "user", "content": "1+2="}],
    "a plain string prompt",
]


@pytest.fixture(scope="module")
def generator(tiny_model_path):
    return TransformersGenerator(tiny_model_path, batch_size=4)


def texts(samples):
    return [[s.text for s in problem] for problem in samples]


def test_k_samples_per_prompt_with_lengths_and_finish_reasons(generator):
    samples = generator.generate(PROMPTS, num_samples=3, temperature=1.0, top_p=0.95, max_new_tokens=6, progress=False)
    assert [len(problem) for problem in samples] == [3, 3, 3]
    for sample in (s for problem in samples for s in problem):
        assert isinstance(sample, Sample) and 1 <= sample.num_tokens <= 6
        assert sample.finish_reason == "length" if sample.num_tokens == 6 else sample.finish_reason == "stop"
        assert "<|im_end|>" not in sample.text and "<pad>" not in sample.text


def test_sampling_is_seeded(generator):
    kwargs = dict(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8, progress=False)
    first = texts(generator.generate(PROMPTS, seed=1, **kwargs))
    assert texts(generator.generate(PROMPTS, seed=1, **kwargs)) == first
    assert texts(generator.generate(PROMPTS, seed=2, **kwargs)) != first


def test_batched_results_come_back_in_prompt_order(generator):
    """Greedy decoding of each prompt alone equals its row in a batch sorted by length and left-padded."""
    batched = texts(
        generator.generate(PROMPTS, num_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=8, progress=False)
    )
    alone = [
        texts(generator.generate([p], num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8, progress=False))[0][
            0
        ]
        for p in PROMPTS
    ]
    assert batched == [[a, a] for a in alone]
    assert len(set(alone)) > 1  # the check means something only if prompts decode differently


def test_render_prompts_uses_the_chat_template(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = render_prompts(tokenizer, PROMPTS[1:])
    expected = tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[0]) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[1]) == "a plain string prompt"
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render_prompts(tokenizer, PROMPTS[:1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_invalid_sampling_settings(generator, kwargs, match):
    settings = dict(num_samples=2, temperature=0.6, top_p=0.95, max_new_tokens=4, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        generator.generate(PROMPTS, **settings)


def test_model_instance_needs_its_tokenizer(generator):
    with pytest.raises(ValueError, match="tokenizer"):
        load_generator(generator.model, backend="transformers")
    assert load_generator(generator.model, tokenizer=generator.tokenizer).backend == "transformers"


def test_explicit_vllm_backend_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    monkeypatch.setattr("trl_flowrl.evaluation.generation.vllm_available", lambda: False)
    with pytest.raises(ImportError, match="vllm"):
        load_generator("some/model", backend="vllm")
    with pytest.raises(ValueError, match="backend"):
        load_generator("some/model", backend="tensorrt")


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model_path):
    """A stand-in `vllm` module recording how the engine and the sampling parameters are built."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            calls["sampling"] = kwargs
            self.n = kwargs["n"]

    class Completion:
        def __init__(self, text, token_ids, finish_reason):
            self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs
            self.llm_engine = types.SimpleNamespace(
                engine_core=types.SimpleNamespace(shutdown=lambda: calls.setdefault("shutdown", True))
            )

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_model_path)

        def generate(self, inputs, params, use_tqdm=True):
            calls["inputs"], calls["use_tqdm"] = inputs, use_tqdm
            return [
                types.SimpleNamespace(
                    outputs=[
                        Completion(f"p{i}s{j}", [1] * (j + 1), "length" if j == params.n - 1 else "stop")
                        for j in range(params.n)
                    ]
                )
                for i in range(len(inputs))
            ]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_vllm_backend_is_used_when_installed(fake_vllm, tiny_model_path):
    generator = load_generator(tiny_model_path, seed=7, vllm_kwargs={"gpu_memory_utilization": 0.5})
    assert isinstance(generator, VLLMGenerator) and generator.backend == "vllm"
    assert fake_vllm["engine"] == {"model": tiny_model_path, "seed": 7, "gpu_memory_utilization": 0.5}
    samples = generator.generate(PROMPTS[:2], num_samples=3, temperature=0.6, top_p=0.95, max_new_tokens=64)
    assert fake_vllm["sampling"] == {"n": 3, "temperature": 0.6, "top_p": 0.95, "max_tokens": 64}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert fake_vllm["inputs"] == [{"prompt_token_ids": ids} for ids in render_prompts(tokenizer, PROMPTS[:2])]
    assert texts(samples) == [["p0s0", "p0s1", "p0s2"], ["p1s0", "p1s1", "p1s2"]]
    assert [s.finish_reason for s in samples[0]] == ["stop", "stop", "length"]
    assert [s.num_tokens for s in samples[1]] == [1, 2, 3]
    generator.close()
    assert fake_vllm["shutdown"] is True


def test_auto_backend_falls_back_to_transformers_for_a_model_instance(fake_vllm, generator):
    assert load_generator(generator.model, tokenizer=generator.tokenizer).backend == "transformers"
    assert "engine" not in fake_vllm


def test_check_model_path_says_what_is_wrong(tiny_model_path, tmp_path, monkeypatch):
    from trl_flowrl.evaluation.generation import check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "flowrl" / "checkpoint-20").mkdir(parents=True)
    check_model_path(tiny_model_path)  # a checkpoint directory
    for missing in ["/nonexistent/model", "./nope", "~/nope", "runs/x/checkpoint-1", "runs/grpo", "my model"]:
        with pytest.raises(FileNotFoundError, match=f"The model path '{re.escape(missing)}' does not exist"):
            check_model_path(missing)
    with pytest.raises(FileNotFoundError, match=r"no config.json.*checkpoint-20"):
        check_model_path("runs/flowrl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download org/model"):
        check_model_path("org/model")  # a hub id, not cached, offline
    check_model_path("org/model", offline_hub=False)  # left to from_pretrained


def test_vllm_on_a_cpu_reserves_a_fixed_cache_unless_told_otherwise(fake_vllm, tiny_model_path, monkeypatch):
    """vLLM's CPU build reads gpu_memory_utilization (0.92 by default) as the share of the machine's memory to reserve
    and refuses to start when that much is not free: on a CPU the backend asks for a fixed cache instead."""
    from trl_flowrl.evaluation import generation

    monkeypatch.setattr(generation, "_on_cpu", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    load_generator(tiny_model_path, seed=0)
    assert fake_vllm["engine"]["kv_cache_memory_bytes"] == generation.CPU_KV_CACHE_BYTES
    load_generator(tiny_model_path, seed=0, vllm_kwargs={"gpu_memory_utilization": 0.3})  # the user's choice wins
    assert "kv_cache_memory_bytes" not in fake_vllm["engine"]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # and so does vLLM's own variable
    load_generator(tiny_model_path, seed=0)
    assert "kv_cache_memory_bytes" not in fake_vllm["engine"]
    monkeypatch.setattr(generation, "_on_cpu", lambda: False)  # GPU vLLM keeps its defaults
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    load_generator(tiny_model_path, seed=0)
    assert "kv_cache_memory_bytes" not in fake_vllm["engine"]
