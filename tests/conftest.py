"""Shared fixtures: a tiny Qwen2 model and tokenizer built locally, and small prompt datasets.

Everything runs offline on the CPU: the model is built from a config (no hub download) and saved to a temporary
directory, whose path is passed to the trainers like a hub model id.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# The test models are far too small for intra-op parallelism, and the suite (and its DDP subprocesses, which inherit
# the variable) shares two cores: more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from packaging.version import Version  # noqa: E402

from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2  # noqa: E402


torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def vllm_model_path(tmp_path_factory):
    """The same builder with a head size that vLLM's CPU attention serves (64 / 2 = 32; it rejects 8)."""
    path = tmp_path_factory.mktemp("tiny-qwen2-vllm")
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, hidden_size=64, num_heads=2, num_kv_heads=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def arithmetic_dataset():
    """Eight conversational prompts with a `solution` column, the shape TRL's math rewards read."""
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (8, 0)]
    ]
    return Dataset.from_list(rows)


REPO_ROOT = Path(__file__).resolve().parents[1]

# transformers 5.17, the newest that vLLM's CPU build allows (and so the floor CI tests), has two bugs that 5.18 fixed:
# a Mixtral router loss that sizes its mask for every token while the logits are kept for fewer, and a Trainer that
# loads the optimizer state onto `cpu:0` when several CPU processes resume (which torch refuses). Both fail in
# `trl.GRPOTrainer` alike; the tests of those features need 5.18.
needs_transformers_5_18 = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18"),
    reason="transformers < 5.18: its MoE router loss and multi-process CPU resume fail in GRPOTrainer itself",
)


def run_distributed(script: Path, *script_args: str, num_processes: int = 2, timeout: int = 600):
    """Run `script` in `num_processes` CPU processes (torch's launcher, gloo) and fail the test with the output tails if
    any process fails. The rendezvous port is a free one, so concurrent runs on the same machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(num_processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(script),
        *script_args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result
