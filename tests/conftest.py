"""Shared fixtures: a tiny Qwen2 model and tokenizer built locally, and small prompt datasets.

Everything runs offline on the CPU: the model is built from a config (no hub download) and saved to a temporary
directory, whose path is passed to the trainers like a hub model id.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Directory holding a randomly initialised tiny Qwen2 model and its character tokenizer."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def arithmetic_dataset():
    """Eight conversational prompts with a `solution` column, the shape TRL's math rewards read."""
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": str(a + b)} for a, b in
            [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (8, 0)]]
    return Dataset.from_list(rows)
