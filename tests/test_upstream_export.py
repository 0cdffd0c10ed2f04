"""scripts/export_to_trl.py, run against a copy of the installed `trl` package laid out as a TRL checkout.

The exported trainers are imported and trained from `trl.experimental` in a subprocess whose `trl` is the copy (so the
real package is never shadowed here), the docs land where TRL keeps them, and the exported tests pass, with local
stand-ins for the tiny hub models and the dataset they load (TRL's own ones cannot be downloaded here).
Also here: the LICENSE file and the package metadata that ships it.
"""

import ast
import ctypes
import difflib
import errno
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl
from conftest import REPO_ROOT
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2


SCRIPT = REPO_ROOT / "scripts" / "export_to_trl.py"
TRL_RUFF_CONFIG = REPO_ROOT / "docs" / "upstream_tests" / "ruff.toml"
SUBPACKAGES = ("flowrl", "exgrpo")

# The parts of a TRL checkout the export edits, shaped as TRL's own (trimmed).
TOCTREE = """\
- sections:
  - local: index
    title: TRL
  title: Getting started
- sections:
  - local: experimental_overview
    title: Experimental Overview
  - local: a2po_trainer # Sorted alphabetically
    title: A2PO
  - local: distillation_trainer
    title: Distillation
  - local: gkd_trainer
    title: GKD
  - local: xpo_trainer
    title: XPO
  title: Experimental
  isExpanded: false
"""

PAPER_INDEX = """\
# Paper Index

<!-- Within sections, papers are sorted by publish dates -->

## Group Relative Policy Optimization

Papers relating to the [`GRPOTrainer`].

### DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models

**📜 Paper**: https://huggingface.co/papers/2402.03300

Introduces GRPO.

```python
### not a heading: inside a code block
training_args = GRPOConfig(loss_type="grpo")
```

### Masked Importance Sampling

**📜 Paper**: https://huggingface.co/papers/2510.18855

Masks tokens.

### Sequence-level Importance Sampling

An entry with no paper link: it has no date to sort by.

### Soft Adaptive Policy Optimization

**📜 Paper**: https://huggingface.co/papers/2511.20347

Soft gates.

## Optimal Advantage Regression

### Accelerating RL for LLM Reasoning with Optimal Advantage Regression

**📜 Paper**: https://huggingface.co/papers/2505.20686
"""

TESTING_UTILS = """\
import pytest
from transformers.utils import is_peft_available


require_peft = pytest.mark.skipif(not is_peft_available(), reason="test requires peft")


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)
"""

# TRL's configs turn bf16 on, which transformers refuses on a machine without a GPU; TRL's test conftest forces
# use_cpu there, and so does this one. The zen dataset the tests load from the Hub is replaced by a local stand-in
# with the same configurations and columns (TRL's tiny models are replaced by a hub cache, see `hub_stand_ins`).
CONFTEST = """\
import datasets
import pytest


@pytest.fixture(autouse=True)
def use_cpu(monkeypatch):
    from trl.trainer.base_config import _BaseConfig

    post_init = _BaseConfig.__post_init__

    def cpu_post_init(self):
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(_BaseConfig, "__post_init__", cpu_post_init)


PROMPTS = [f"Tell me about the number {i}." for i in range(6)]  # TRL's has 17 rows; fewer steps here
hub_load_dataset = datasets.load_dataset


def zen(name):
    rows = {
        "standard_prompt_only": [{"prompt": p} for p in PROMPTS],
        "conversational_prompt_only": [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS],
    }[name]
    return datasets.DatasetDict(train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:2]))


def load_dataset(path, name=None, split=None, **kwargs):
    if path != "trl-internal-testing/zen":
        return hub_load_dataset(path, name, split=split, **kwargs)
    return zen(name) if split is None else zen(name)[split]


datasets.load_dataset = load_dataset  # before the test modules import it
"""

TRAIN_SCRIPT = """
import json
import os
import sys

import torch

torch.set_num_threads(1)
checkout, model_path, output_dir = sys.argv[1:4]

import trl
import trl.trainer.base_trainer
from datasets import Dataset
from trl.experimental.exgrpo import ExGRPOConfig, ExGRPOTrainer
from trl.experimental.flowrl import FlowRLConfig, FlowRLTrainer

topics = []  # what TRL's usage telemetry would report (never sent: offline)
trl.trainer.base_trainer.send_telemetry = lambda topic, **kwargs: topics.append(topic)


def parity_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)])
common = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=1e-2, logging_steps=1,
    save_strategy="no", use_cpu=True, bf16=False, report_to="none", seed=0, disable_tqdm=True,
)
runs = [
    ("flowrl", FlowRLTrainer, FlowRLConfig(os.path.join(output_dir, "flowrl"), max_steps=1, **common)),
    # Two steps: the first collects (no warm-up), the second replays a stored trajectory.
    ("exgrpo", ExGRPOTrainer, ExGRPOConfig(os.path.join(output_dir, "exgrpo"), max_steps=2, delayed_start_threshold=0.0, **common)),
]
result = {"trl_file": trl.__file__}
for name, trainer_class, args in runs:
    trainer = trainer_class(model=model_path, reward_funcs=parity_reward, args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    result[name] = {
        "module": type(trainer).__module__,
        "steps": trainer.state.global_step,
        "unchanged": [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])],
        "logs": [{k: v for k, v in log.items() if isinstance(v, (int, float))} for log in trainer.state.log_history],
    }
result["telemetry_topics"] = topics
result["imported_trl_flowrl"] = sorted(m for m in sys.modules if m.split(".")[0] == "trl_flowrl")
print("RESULT " + json.dumps(result))
"""


def load_script():
    spec = importlib.util.spec_from_file_location("export_to_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkout(root: Path) -> Path:
    """A copy of the installed trl package plus the docs and test scaffolding of a TRL checkout."""
    shutil.copytree(Path(trl.__file__).parent, root / "trl", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "docs/source").mkdir(parents=True)
    (root / "docs/source/_toctree.yml").write_text(TOCTREE)
    (root / "docs/source/paper_index.md").write_text(PAPER_INDEX)
    (root / "tests/experimental").mkdir(parents=True)
    (root / "tests/__init__.py").write_text("")
    (root / "tests/experimental/__init__.py").write_text("")
    (root / "tests/testing_utils.py").write_text(TESTING_UTILS)
    (root / "tests/conftest.py").write_text(CONFTEST)
    return root


def run_export(checkout: Path):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(checkout)], capture_output=True, text=True, timeout=120, cwd=checkout
    )


def checkout_env(checkout: Path, hub_cache: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def tree_state(root: Path) -> dict:
    """Every path under `root`, links not followed: folders and files with their modes, files with their bytes."""
    state = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if path.is_symlink():
                state[path] = ("link", os.readlink(path))
            elif path.is_dir():
                state[path] = ("folder", mode)
            else:
                state[path] = ("file", mode, path.read_bytes())
    return state


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    checkout = make_checkout(tmp_path_factory.mktemp("trl-checkout"))
    result = run_export(checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    return checkout


@pytest.fixture(scope="module")
def hub_stand_ins(tmp_path_factory):
    """A Hugging Face hub cache holding local stand-ins for TRL's tiny test models (offline mode reads from it): the
    suite's tiny Qwen2 as `tiny-Qwen2ForCausalLM-2.5`, and a reward model of the same shape with one label."""
    cache = tmp_path_factory.mktemp("hub-cache")
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_qwen2(tokenizer)
    config = policy.config.to_dict() | {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}
    reward_model = Qwen2ForSequenceClassification(Qwen2Config(**config))
    commit = "0" * 40
    for name, model in [("CausalLM", policy), ("SequenceClassification", reward_model)]:
        repo = cache / f"models--trl-internal-testing--tiny-Qwen2For{name}-2.5"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs/main").write_text(commit)
        model.save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
    return cache


def exported_modules(checkout: Path, name: str) -> list[Path]:
    return sorted((checkout / "trl/experimental" / name).rglob("*.py"))


def test_every_module_is_exported_with_trl_imports_that_resolve_in_the_checkout(exported):
    lines = (exported / "trl/__init__.py").read_text().splitlines(keepends=True)
    header = "".join(lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert "Licensed under the Apache License" in header
    for name in SUBPACKAGES:
        ours = {
            p.relative_to(REPO_ROOT / "trl_flowrl" / name) for p in (REPO_ROOT / "trl_flowrl" / name).rglob("*.py")
        }
        theirs = {p.relative_to(exported / "trl/experimental" / name) for p in exported_modules(exported, name)}
        assert ours and theirs == ours  # whatever the subpackage holds today

        for path in exported_modules(exported, name):
            text = path.read_text()
            assert text.startswith(header + "\n"), f"{path} lacks TRL's copyright header"
            assert "trl_flowrl" not in text
            package = path.parent
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Import):
                    assert all(a.name.split(".")[0] not in ("trl", "trl_flowrl") for a in node.names), path
                if not isinstance(node, ast.ImportFrom):
                    continue
                assert node.level or node.module.split(".")[0] not in ("trl", "trl_flowrl"), (path, node.module)
                if node.level:
                    base = package.parents[node.level - 2] if node.level > 1 else package
                    target = base.joinpath(*(node.module or "").split("."))
                    assert target.with_suffix(".py").is_file() or (target / "__init__.py").is_file(), (
                        f"{path.name}: from {'.' * node.level}{node.module or ''} does not resolve"
                    )
    # The rewritten imports sit where TRL's isort wants them, and the export keeps the files formatted as TRL's ruff
    # wants them. (A source module that is not formatted in this repository is CI's finding, not the export's.)
    ruff = [sys.executable, "-m", "ruff"]

    def formatted(path, config=None):
        command = ruff + ["format", "--check", "--no-cache", str(path)] + (["--config", str(config)] if config else [])
        return subprocess.run(command, capture_output=True, text=True, timeout=60).returncode == 0

    modules = [p for name in SUBPACKAGES for p in exported_modules(exported, name)]
    tests = sorted((exported / "tests/experimental").glob("test_*.py"))
    result = subprocess.run(
        ruff + ["check", "--config", str(TRL_RUFF_CONFIG), "--select", "I,F", "--no-cache", *map(str, modules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        ruff + ["check", "--config", str(TRL_RUFF_CONFIG), "--no-cache", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in tests:
        assert formatted(path, TRL_RUFF_CONFIG), f"{path.name} is not formatted as TRL's ruff wants"
    for path in modules:
        source = REPO_ROOT / "trl_flowrl" / path.relative_to(exported / "trl/experimental")
        if formatted(source):
            assert formatted(path, TRL_RUFF_CONFIG), f"exporting {source.name} broke its formatting"


def test_docs_pages_toctree_and_paper_index_entries(exported):
    for name in SUBPACKAGES:
        page = exported / f"docs/source/{name}_trainer.md"
        assert page.read_text() == (REPO_ROOT / f"docs/{name}_trainer.md").read_text()
        assert f"[[autodoc]] experimental.{name}." in page.read_text()
        test = (exported / f"tests/experimental/test_{name}_trainer.py").read_text()
        assert test.endswith((REPO_ROOT / f"docs/upstream_tests/test_{name}_trainer.py").read_text())

    toc = (exported / "docs/source/_toctree.yml").read_text()
    experimental = toc.split("- sections:")[2]
    assert re.findall(r"local: (\w+)", experimental) == [
        "experimental_overview",
        "a2po_trainer",
        "distillation_trainer",
        "exgrpo_trainer",
        "flowrl_trainer",
        "gkd_trainer",
        "xpo_trainer",
    ]
    assert "  - local: flowrl_trainer\n    title: FlowRL\n" in toc
    assert "  - local: exgrpo_trainer\n    title: ExGRPO\n" in toc

    index = (exported / "docs/source/paper_index.md").read_text()
    grpo, others = index.split("## Group Relative Policy Optimization")[1].split("\n## ", 1)
    # in date order (arXiv ids), between DeepSeekMath (2402) and Masked Importance Sampling (2510.18855)
    prose = re.sub(r"```.*?```", "", grpo, flags=re.S)
    assert re.findall(r"^### (.*?)[:\n]", prose, flags=re.M) == [
        "DeepSeekMath",
        "FlowRL",
        "ExGRPO",
        "Masked Importance Sampling",
        "Sequence-level Importance Sampling",
        "Soft Adaptive Policy Optimization",
    ]
    assert "papers/2509.15207" not in others and "papers/2510.02245" not in others
    for name in SUBPACKAGES:
        entry = (REPO_ROOT / f"docs/paper_index/{name}.md").read_text().rstrip("\n")
        assert entry + "\n\n### " in grpo
        assert f"from trl.experimental.{name} import" in entry


def test_running_the_export_again_changes_nothing(exported):
    before = snapshot(exported)
    result = run_export(exported)
    assert result.returncode == 0, result.stderr
    assert snapshot(exported) == before


def test_trainers_join_trls_telemetry_allowlist_among_the_experimental_ones(exported):
    installed = (Path(trl.__file__).parent / "trainer/base_trainer.py").read_text()
    written = (exported / "trl/trainer/base_trainer.py").read_text()
    changes = [
        line for line in difflib.ndiff(installed.splitlines(), written.splitlines()) if line[:2] in ("+ ", "- ")
    ]
    assert changes == ['+     "ExGRPOTrainer",', '+     "FlowRLTrainer",']
    lines = written.splitlines()
    start = lines.index("    # Experimental")
    experimental = [line.strip().strip('",') for line in lines[start + 1 : lines.index("}", start)]]
    assert experimental == sorted(experimental, key=str.lower)  # TRL's order (OnlineDPOTrainer before ORPOTrainer)

    export = load_script()
    where = Path("base_trainer.py")
    text = '_TELEMETRY_TRAINERS = {\n    "GRPOTrainer",  # Stable\n    # Experimental\n    "A2POTrainer",\n    "GKDTrainer"\n}\n'
    assert export.register_telemetry(text, where, ["FlowRLTrainer", "ExGRPOTrainer", "ZTrainer", "A2POTrainer"]) == (
        '_TELEMETRY_TRAINERS = {\n    "GRPOTrainer",  # Stable\n    # Experimental\n    "A2POTrainer",\n'
        '    "ExGRPOTrainer",\n    "FlowRLTrainer",\n    "GKDTrainer",\n    "ZTrainer",\n}\n'
    )
    assert export.register_telemetry("import os\n", where, ["FlowRLTrainer"]) is None  # a TRL without telemetry
    with pytest.raises(export.ExportError, match="add 'FlowRLTrainer' to it by hand"):
        export.register_telemetry('_TELEMETRY_TRAINERS = {"GRPOTrainer", "SFTTrainer"}\n', where, ["FlowRLTrainer"])


def test_telemetry_insertion_counts_the_first_experimental_entry_in_its_section():
    export = load_script()
    where = Path("base_trainer.py")
    stable = '_TELEMETRY_TRAINERS = {\n    "GRPOTrainer",\n    "SFTTrainer",\n    # Experimental\n'
    # A name that sorts before the first experimental entry goes before it, not after it.
    text = stable + '    "BCOTrainer",\n    "GKDTrainer",\n}\n'
    assert export.register_telemetry(text, where, ["AlphaTrainer"]) == (
        stable + '    "AlphaTrainer",\n    "BCOTrainer",\n    "GKDTrainer",\n}\n'
    )
    # A section of one entry is a section: the new names join it, in order, never the stable list above it.
    text = stable + '    "KTOTrainer"\n}\n'
    assert export.register_telemetry(text, where, ["FlowRLTrainer", "ZTrainer"]) == (
        stable + '    "FlowRLTrainer",\n    "KTOTrainer",\n    "ZTrainer",\n}\n'
    )


def test_exported_trainers_train_from_trl_experimental(exported, tiny_model_path, tmp_path):
    env = checkout_env(exported)
    env.pop("CI", None)  # TRL skips its telemetry on CI
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(exported), tiny_model_path, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert Path(report["trl_file"]).is_relative_to(exported)  # the copy, not the installed trl
    assert report["imported_trl_flowrl"] == []  # the exported trainers stand on TRL alone

    flowrl, exgrpo = report["flowrl"], report["exgrpo"]
    assert flowrl["module"] == "trl.experimental.flowrl.flowrl_trainer"
    assert exgrpo["module"] == "trl.experimental.exgrpo.exgrpo_trainer"
    assert flowrl["steps"] == 1 and exgrpo["steps"] == 2
    assert flowrl["unchanged"] == [] and exgrpo["unchanged"] == []
    assert "flowrl/log_z/mean" in flowrl["logs"][0]
    # On TRL's telemetry allowlist: reported by name, not as "other".
    assert report["telemetry_topics"] == ["trl/FlowRLTrainer", "trl/ExGRPOTrainer"]
    replayed = [log["replay/replayed_questions_fraction"] for log in exgrpo["logs"] if "replay/phase" in log]
    assert replayed == [0.0, 0.5]  # 2 questions per batch: one replayed in the second step


def test_exported_tests_pass_with_local_stand_ins_for_the_hub(exported, hub_stand_ins):
    # TRL runs them on its tiny hub models and zen dataset; here, local models and prompts of the same kinds.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "tests/experimental"],
        capture_output=True,
        text=True,
        timeout=600,
        env=checkout_env(exported, hub_stand_ins),
        cwd=exported,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    collected = len(
        re.findall(
            r"^\s*def test_",
            "".join((REPO_ROOT / f"docs/upstream_tests/test_{name}_trainer.py").read_text() for name in SUBPACKAGES),
            flags=re.M,
        )
    )
    assert re.fullmatch(r"\d+ passed in .*", summary) and int(summary.split()[0]) > collected, summary


def test_export_refuses_what_it_cannot_carry_into_trl(exported, tmp_path):
    export = load_script()
    checkout = export.TrlCheckout(exported)

    def rewrite(source, subpackage="flowrl"):
        return export.ModuleRewriter(checkout, subpackage, Path("module.py")).rewrite(source)

    refused = {
        "from trl_flowrl.rewards import math_reward\n": "not exported to TRL",
        "from trl_flowrl import tiny_models\n": "not exported to TRL",
        "from ..data import load\n": "not exported to TRL",
        "import trl\n": "write it as `from ... import ...`",
        "from trl.trainer.utils import a_helper_trl_never_had\n": "does not have (TRL version",
        "from trl import NoSuchTrainer\n": "does not have (TRL version",
        "from trl.trainer.grpo_trainer import *\n": "star imports",
        '"""Like trl_flowrl.rewards."""\n': "still refers to this package",
    }
    for source, message in refused.items():
        with pytest.raises(export.ExportError, match=re.escape(message)):
            rewrite(source)

    # Imports of trl move into the relative section, sorted as TRL's isort sorts it; imports in functions stay put.
    source = (
        '"""Doc."""\n\nimport torch\nfrom trl import GRPOTrainer\nfrom trl.trainer.utils import pad\n\n'
        "from .objective import loss\nfrom trl_flowrl.flowrl.log_z import LogZHead\n"
        "from trl_flowrl.exgrpo.replay_buffer import ReplayBuffer\n\n\n"
        "def f():\n    from trl.trainer.utils import nanmax  # lazily\n    return nanmax\n"
    )
    assert rewrite(source) == (
        '"""Doc."""\n\nimport torch\n\nfrom ...trainer.grpo_trainer import GRPOTrainer\n'
        "from ...trainer.utils import pad\nfrom ..exgrpo.replay_buffer import ReplayBuffer\n"
        "from .log_z import LogZHead\nfrom .objective import loss\n\n\n"
        "def f():\n    from ...trainer.utils import nanmax  # lazily\n    return nanmax\n"
    )

    # Not a TRL checkout: a clear error, and nothing written.
    empty = tmp_path / "not-trl"
    empty.mkdir()
    result = run_export(empty)
    assert result.returncode == 1
    assert "is not a TRL checkout" in result.stderr and "Nothing in the checkout was changed" in result.stderr
    assert list(empty.iterdir()) == []


def test_license_is_apache_2_and_the_package_metadata_ships_it(tmp_path):
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    # Build the wheel's metadata from pyproject.toml (setuptools >= 77 picks up LICEN[CS]E* by default).
    for name in ("pyproject.toml", "README.md", "LICENSE", "trl_flowrl/__init__.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dist_info = tmp_path / "out" / result.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert (dist_info / "licenses" / "LICENSE").read_text() == text


# ----------------------------------------------------------------------------------------------------------------------
# All or nothing: after any failure the checkout is byte for byte what it was.


@pytest.fixture
def previous_export(exported, tmp_path):
    """A checkout holding an older export, which a successful run would change (a module since removed, a page
    since rewritten); beside it, a folder outside the checkout."""
    checkout = tmp_path / "checkout"
    shutil.copytree(exported, checkout, symlinks=True)
    (checkout / "trl/experimental/exgrpo/from_an_older_export.py").write_text("OLD = 1\n")
    (checkout / "docs/source/flowrl_trainer.md").write_text("# FlowRL (an older page)\n")
    (tmp_path / "elsewhere").mkdir()
    return checkout


def _folder_where_a_page_goes(checkout: Path):
    page = checkout / "docs/source/exgrpo_trainer.md"
    page.unlink()
    page.mkdir()
    (page / "draft.md").write_text("someone's notes\n")


def _latin1_toctree(checkout: Path):
    toc = checkout / "docs/source/_toctree.yml"
    toc.write_bytes(toc.read_text().replace("title: GKD", "title: GKD (café)").encode("latin-1"))


def _newer_python_syntax(checkout: Path):
    candidates = ["type Alias = int\n", "try:\n    pass\nexcept ValueError, TypeError:\n    pass\n"]  # 3.12, 3.14
    newer = next((c for c in candidates if not _parses(c)), None)
    if newer is None:
        pytest.skip("this Python parses every syntax the test knows of")
    with open(checkout / "trl/__init__.py", "a") as handle:
        handle.write(newer)


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def _symlinked_trainer_folder(checkout: Path):
    # e.g. a developer's link from the checkout to a copy of the trainers kept elsewhere
    target = checkout.parent / "elsewhere/flowrl"
    shutil.move(checkout / "trl/experimental/flowrl", target)
    (checkout / "trl/experimental/flowrl").symlink_to(target)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_folder_where_a_page_goes, "exgrpo_trainer.md is not a regular file (a folder?)"),
        (_latin1_toctree, "_toctree.yml is not UTF-8 text"),
        (_newer_python_syntax, "trl/__init__.py, line"),
        (_symlinked_trainer_folder, "trl/experimental/flowrl is a symbolic link"),
    ],
)
def test_a_checkout_the_export_cannot_write_is_left_unchanged(previous_export, damage, message):
    damage(previous_export)
    before = tree_state(previous_export.parent)  # the checkout and the folder outside it
    result = run_export(previous_export)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("export_to_trl: ") and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr and result.stderr.rstrip().endswith("Nothing in the checkout was changed.")
    assert tree_state(previous_export.parent) == before


def _drop_root_override():
    # Root writes into read-only folders regardless of their mode; without CAP_DAC_OVERRIDE (dropped from the
    # capability bounding set before exec) the child obeys the permission bits like any user.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_docs_folder_leaves_the_checkout_unchanged(previous_export):
    docs = previous_export / "docs"
    paths = [docs, *docs.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    preexec = _drop_root_override if os.geteuid() == 0 else None
    try:
        for path in paths:
            path.chmod(modes[path] & ~0o222)
        probe = [sys.executable, "-c", "import sys; open(sys.argv[1], 'x')", str(docs / "source/probe")]
        try:
            writable = subprocess.run(probe, capture_output=True, timeout=60, preexec_fn=preexec).returncode == 0
        except subprocess.SubprocessError:
            writable = True
        if writable:
            pytest.skip("this user writes into read-only folders (cannot drop CAP_DAC_OVERRIDE)")
        before = tree_state(previous_export.parent)
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(previous_export)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=preexec,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.startswith("export_to_trl: cannot write ") and "Permission denied" in result.stderr
        assert "Traceback" not in result.stderr and "Nothing in the checkout was changed." in result.stderr
        # trl/experimental/exgrpo/ (with its older module) included: the staged new folders were thrown away
        assert tree_state(previous_export.parent) == before
    finally:
        for path in reversed(paths):
            path.chmod(modes[path])


def test_a_failure_part_way_through_writing_puts_everything_back(previous_export, monkeypatch, capsys):
    """Each rename the export makes fails in turn (an I/O error; once a Ctrl-C): every time, what was moved in is
    moved out and what was moved aside is moved back. Then a run with no failure changes the checkout."""
    export = load_script()
    before = tree_state(previous_export.parent)
    rename = os.rename
    for failing in range(1, 100):
        calls = []
        interrupt = failing == 5

        def rename_failing_once(source, destination, failing=failing, calls=calls, interrupt=interrupt):
            calls.append(source)
            if len(calls) == failing:
                if interrupt:
                    raise KeyboardInterrupt
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(source))
            rename(source, destination)

        monkeypatch.setattr(os, "rename", rename_failing_once)
        if interrupt:
            with pytest.raises(KeyboardInterrupt):
                export.main([str(previous_export)])
            code = 1
        else:
            code = export.main([str(previous_export)])
        monkeypatch.setattr(os, "rename", rename)
        if len(calls) < failing:
            break  # every rename done: the export went through
        assert code == 1
        assert tree_state(previous_export.parent) == before, f"rename {failing} of {calls[-1]}"
        if not interrupt:
            err = capsys.readouterr().err
            assert err.startswith("export_to_trl: cannot write ") and "Input/output error" in err
            assert err.rstrip().endswith("Nothing in the checkout was changed.")
    # 9 targets (2 folders, 7 files), each moved aside and its new version moved in
    assert code == 0 and failing == 19
    assert not (previous_export / "trl/experimental/exgrpo/from_an_older_export.py").exists()
    assert (previous_export / "docs/source/flowrl_trainer.md").read_text() == (
        REPO_ROOT / "docs/flowrl_trainer.md"
    ).read_text()
    hidden = [p for p in previous_export.rglob(".*export-*")]
    assert hidden == []


def test_missing_parent_folders_are_created_and_removed_again_on_failure(tmp_path, monkeypatch):
    export = load_script()
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "docs/page.md").write_text("old\n")
    folders = {Path("trl/experimental/newalgo"): {Path("__init__.py"): "X = 1\n", Path("sub/mod.py"): "Y = 2\n"}}
    files = {Path("docs/page.md"): "new\n", Path("tests/experimental/test_new.py"): "def test_new():\n    pass\n"}
    for relative in folders:
        export.check_target(root, relative, folder=True)
    for relative in files:
        export.check_target(root, relative, folder=False)
    before = tree_state(tmp_path)

    # A failure while staging (the last file), then each rename failing in turn: the created folders go again.
    write_new = export._write_new

    def write_failing_on_the_test(path, text):
        if path.name.startswith(".test_new.py"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_new(path, text)

    monkeypatch.setattr(export, "_write_new", write_failing_on_the_test)
    with pytest.raises(export.ExportError, match="No space left on device"):
        export.write_checkout(root, folders, files)
    assert tree_state(tmp_path) == before
    monkeypatch.setattr(export, "_write_new", write_new)
    rename = os.rename
    for failing in range(1, 5):  # 3 targets: 4 renames, the one that exists being moved aside first
        calls = []

        def rename_failing(source, destination, calls=calls, failing=failing):
            calls.append(source)
            if len(calls) == failing:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(source))
            rename(source, destination)

        monkeypatch.setattr(os, "rename", rename_failing)
        with pytest.raises(export.ExportError, match="Input/output error"):
            export.write_checkout(root, folders, files)
        monkeypatch.setattr(os, "rename", rename)
        assert tree_state(tmp_path) == before, f"rename {failing}"

    assert export.write_checkout(root, folders, files) == []
    assert (root / "trl/experimental/newalgo/sub/mod.py").read_text() == "Y = 2\n"
    assert (root / "tests/experimental/test_new.py").read_text() == "def test_new():\n    pass\n"
    assert (root / "docs/page.md").read_text() == "new\n"

    (root / "notes").write_text("a file where a folder goes\n")
    with pytest.raises(export.ExportError, match=r"checkout/notes is not a folder; the export writes notes/a/b.md"):
        export.check_target(root, Path("notes/a/b.md"), folder=False)
