"""Sampling k completions per prompt: vLLM when it is installed, `transformers` `generate` otherwise.

`load_generator(model, ...)` loads a checkpoint (a local path or a hub id) once; its `generate(prompts, ...)` returns,
for each prompt, `num_samples` `Sample`s (decoded text without special tokens, token count, and whether generation
stopped on an end-of-sequence token or ran into `max_new_tokens`). Conversational prompts go through the tokenizer's
chat template with the generation prompt added; string prompts are used as they are.

- vLLM: one `LLM` seeded with `seed` (the engine's seed, set once per model), `SamplingParams(n=k, temperature,
  top_p, max_tokens)`, prompts passed as token ids (so the chat template's special tokens are not added twice) and
  vLLM's own progress bar. Extra engine arguments (`tensor_parallel_size`, `gpu_memory_utilization`, `dtype`, ...)
  go through `vllm_kwargs`. On a CPU (vLLM's CPU build), the engine's cache is 2 GiB unless `vllm_kwargs` or
  `VLLM_CPU_KVCACHE_SPACE` say otherwise: the CPU build reads `gpu_memory_utilization` as a share of the machine's
  memory to reserve.
- transformers: each prompt repeated k times, sequences sorted by prompt length and generated `batch_size` at a time
  with left padding, `do_sample=True` (greedy when temperature is 0), under a forked RNG seeded by `seed`, with a tqdm
  bar over sequences. Runs on the first GPU when there is one (bfloat16), else on the CPU (float32); `model_kwargs`
  go to `from_pretrained`.

Both backends sample with temperature and top_p only: a checkpoint's own `generation_config` sampling settings
(top_k, min_p, repetition penalty) are overridden here, and vLLM does not apply them to explicit `SamplingParams`.

Not handled: several GPUs with the transformers backend (use vLLM's tensor parallelism), and releasing a vLLM engine's
GPU memory on every vLLM version: `close()` does what it can, but when a second model does not fit after the first,
evaluate each model in its own run and merge the results (`python -m trl_flowrl.evaluation --merge ...`).
"""

from __future__ import annotations

import gc
import glob
import importlib.util
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")
# Every sample of a problem is kept, graded and compared with the others (diversity) in memory, so k is bounded; the
# bound is far above the k of pass@k curves in practice (16 to 1024).
MAX_NUM_SAMPLES = 2**16


@dataclass(frozen=True)
class Sample:
    """One sampled completion: its text, its number of generated tokens, and `"stop"` (EOS) or `"length"`."""

    text: str
    num_tokens: int
    finish_reason: str


def check_model_path(model: str, offline_hub: bool = True) -> None:
    """Fail early, saying what to change, when `model` is neither a checkpoint directory nor a usable hub id.

    A path that does not exist is an error when it looks local (starts with `/`, `.` or `~`, has a separator
    besides the one of `org/name`, or its first part exists here) or is no valid hub id; a directory without a
    `config.json` (nor a PEFT `adapter_config.json`) is an error that lists its `checkpoint-*` folders. With
    `offline_hub`, a hub id that is not in the local cache while the hub is offline (`HF_HUB_OFFLINE=1`) is an error
    too. Anything else (a file, an online hub id) is left to `from_pretrained`. Raises FileNotFoundError or ValueError.
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not any(os.path.isfile(os.path.join(expanded, f)) for f in ("config.json", "adapter_config.json")):
            checkpoints = sorted(glob.glob(os.path.join(expanded, "checkpoint-*")), key=len)[-3:]
            hint = f" It holds the checkpoints {checkpoints}: give one of them." if checkpoints else ""
            raise FileNotFoundError(f"The model directory {model!r} has no config.json, so it is no checkpoint.{hint}")
        return
    if os.path.exists(expanded):
        return
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    first = model.replace("\\", "/").split("/")[0]
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model or os.path.isdir(first)
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"The model path {model!r} does not exist (looked for {os.path.abspath(expanded)}): give a checkpoint "
            "directory (with a config.json), or a hub id such as 'Qwen/Qwen2.5-7B'."
        )
    offline = is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline_hub and offline and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise FileNotFoundError(
            f"The model {model!r} is not a local directory, and the hub is offline (HF_HUB_OFFLINE) with no copy of "
            f"it in the cache: download it first (`huggingface-cli download {model}`), or give a local path."
        )


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def prompt_problem(prompt) -> str | None:
    """What makes `prompt` unusable (None when it is fine): a prompt is a non-blank string, or a non-empty list of
    messages, each a dict with a string `role` and a `content` (a string, or a list of content blocks)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else f"the prompt is a blank string ({prompt!r})"
    if not isinstance(prompt, (list, tuple)):
        return (
            f"the prompt is {type(prompt).__name__} {prompt!r:.60}, not a string or a list of "
            "{'role': ..., 'content': ...} messages"
        )
    if not prompt:
        return "the prompt is an empty list of messages"
    for j, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            return f"message {j} of the prompt is {type(message).__name__} {message!r:.60}, not a dict"
        for key, kinds in (("role", (str,)), ("content", (str, list, tuple))):
            if message.get(key) is None:  # a JSONL row whose message lacks a key reads back as None
                present = sorted(k for k, v in message.items() if v is not None)
                return f"message {j} of the prompt has no `{key}` (it has {present})"
            if not isinstance(message[key], kinds):
                return f"message {j} of the prompt has a `{key}` of type {type(message[key]).__name__}"
    return None


def render_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids of each prompt: chat template (with generation prompt) for conversations, plain text otherwise."""
    ids = []
    for i, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(f"Prompt {i} cannot be generated from: {problem}.")
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(
                    "The prompts are conversational but the tokenizer has no chat template: use a model with one, "
                    "set `tokenizer.chat_template`, or give string prompts."
                )
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids[-1]:  # generate() cannot start from nothing
            raise ValueError(f"Prompt {i} ({prompt!r:.60}) has no tokens once rendered: give it some text.")
    return ids


def check_sampling(num_samples: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise ValueError(
            f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {num_samples}: every sample of a problem is kept and "
            "graded in memory."
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")


class TransformersGenerator:
    """Batched sampling with `model.generate` (see the module docstring)."""

    backend = "transformers"

    def __init__(self, model, tokenizer=None, batch_size: int = 64, model_kwargs: dict | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        if isinstance(model, str):
            kwargs = dict(model_kwargs or {})
            if torch.cuda.is_available():
                kwargs.setdefault("dtype", torch.bfloat16)
                kwargs.setdefault("device_map", {"": 0})
            else:
                kwargs.setdefault("dtype", torch.float32)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            self._owns_model = True
        else:
            if tokenizer is None:
                raise ValueError("A model instance needs its tokenizer: pass `tokenizer=`.")
            self.model, self.tokenizer, self._owns_model = model, tokenizer, False
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        if not self.eos_ids:
            raise ValueError("The model has no end-of-sequence token (generation_config.eos_token_id or tokenizer's).")

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int = 0,
        desc: str | None = None,
        progress: bool = True,
    ) -> list[list[Sample]]:
        from tqdm.auto import tqdm

        check_sampling(num_samples, temperature, top_p, max_new_tokens)
        prompt_ids = render_prompts(self.tokenizer, prompts)
        # The k copies of each prompt, prompts grouped by length to pad little. Drawn lazily, so that memory follows
        # the samples generated, not P * k up front.
        by_length = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        order = (i for i in by_length for _ in range(num_samples))
        results: list[list[Sample]] = [[] for _ in prompt_ids]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        # Explicit neutral values: a checkpoint's generation_config (e.g. top_k=20, repetition_penalty=1.05) would
        # otherwise fill in whatever is left unset, and the two backends would sample different distributions.
        if temperature > 0:
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0)
        else:
            sampling = dict(do_sample=False)
        sampling["repetition_penalty"] = 1.0
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(prompt_ids) * num_samples, desc=desc or "generating", unit="sample", disable=not progress)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                while batch := list(itertools.islice(order, self.batch_size)):
                    rows = [prompt_ids[i] for i in batch]
                    width = max(map(len, rows))
                    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
                    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                    output = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=pad,
                        eos_token_id=self.eos_ids,
                        **sampling,
                    )
                    for i, tokens in zip(batch, output[:, width:].tolist()):
                        results[i].append(self._sample(tokens))
                    bar.update(len(batch))
        finally:
            bar.close()
            self.model.train(was_training)
        return results

    def _sample(self, tokens: list[int]) -> Sample:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Sample(text, len(kept), "length" if stop is None else "stop")

    def close(self) -> None:
        if self._owns_model:
            del self.model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


CPU_KV_CACHE_BYTES = 2 * 2**30  # the vLLM backend's cache on a CPU, unless VLLM_CPU_KVCACHE_SPACE or vllm_kwargs say


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a vLLM without platforms (or a stand-in): leave its defaults alone
        return False
    return current_platform.is_cpu()


class VLLMGenerator:
    """Sampling with a vLLM engine (see the module docstring)."""

    backend = "vllm"

    def __init__(self, model: str, seed: int = 0, vllm_kwargs: dict | None = None):
        from vllm import LLM

        if not isinstance(model, str):
            raise TypeError(
                "The vLLM backend loads checkpoints by path or hub id; "
                "use the transformers backend for a model instance."
            )
        vllm_kwargs = dict(vllm_kwargs or {})
        chosen = {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(vllm_kwargs)
        if not chosen and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and _on_cpu():
            # vLLM's CPU build reads `gpu_memory_utilization` (0.92 by default) as a share of the machine's memory to
            # reserve, and refuses to start when less is free; a fixed cache is plenty for evaluation.
            vllm_kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        self.llm = LLM(model=model, seed=seed, **vllm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompts: Sequence,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int = 0,
        desc: str | None = None,
        progress: bool = True,
    ) -> list[list[Sample]]:
        from vllm import SamplingParams

        check_sampling(num_samples, temperature, top_p, max_new_tokens)
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        inputs = [{"prompt_token_ids": ids} for ids in render_prompts(self.tokenizer, prompts)]
        if desc and progress:
            logger.info("vLLM: %s", desc)
        outputs = self.llm.generate(inputs, params, use_tqdm=progress)
        samples = []
        for request in outputs:
            if len(request.outputs) != num_samples:
                raise RuntimeError(
                    f"vLLM returned {len(request.outputs)} samples for a prompt, expected {num_samples}."
                )
            samples.append(
                [
                    Sample(o.text, len(o.token_ids), "stop" if o.finish_reason != "length" else "length")
                    for o in request.outputs
                ]
            )
        return samples

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as error:  # best effort: the engine may already be gone
                logger.warning("Could not shut the vLLM engine down cleanly: %s", error)
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_generator(
    model,
    tokenizer=None,
    backend: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    model_kwargs: dict | None = None,
    vllm_kwargs: dict | None = None,
):
    """A `VLLMGenerator` or `TransformersGenerator` for `model` (a path, hub id, or, for transformers, an instance).

    `backend="auto"` picks vLLM when it is installed and `model` is a path or hub id, transformers otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "vllm" and not vllm_available():
        raise ImportError("backend='vllm' needs vLLM: pip install 'trl-flowrl[vllm]', or use backend='transformers'.")
    use_vllm = backend == "vllm" or (backend == "auto" and vllm_available() and isinstance(model, str))
    if use_vllm:
        if tokenizer is not None:
            logger.warning("The vLLM backend uses the checkpoint's own tokenizer; the `tokenizer` given is ignored.")
        return VLLMGenerator(model, seed=seed, vllm_kwargs=vllm_kwargs)
    return TransformersGenerator(model, tokenizer=tokenizer, batch_size=batch_size, model_kwargs=model_kwargs)
