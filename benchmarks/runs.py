"""Training runs on the embedded arithmetic task, tracked on a fixed held-out set, and their cache: shared by
benchmarks 2, 3 and 4.

`tracked_run(arm, seed, steps, spec)` trains one *arm* of `arms.ARMS`: a trainer (GRPO, FlowRL or ExGRPO) with exactly
the settings of the recipes' embedded config (`recipes/configs/embedded/<trainer>_arithmetic.yaml`, read with
`trl_flowrl.recipe.parse_recipe_args`) plus the arm's own command-line overrides (e.g. `--beta 0.0667` for GRPO with
a KL term); the seed, the number of steps and the output directory are set per run, progress bars turned off. A
caller may add overrides (`extra_overrides`, e.g. `--num_train_problems 800`) and train another model than the
embedded one (`model_path`; the embedded recipe's settings are kept). It returns a record of the run:

- a curve measured on the held-out set (`heldout.py`) at step 0 and every `spec.every` steps: held-out accuracy
  (avg@k), pass@k, distinct correct paths per problem, entropy over the correct paths, and how far the policy's
  distribution over each problem's enumerated correct paths is from the reference model's (see
  `metrics.path_distribution_distance`), with the rollouts generated and the distinct questions trained on so far;
- the rollouts each trainer actually generates, counted at TRL's generation call: every row it generates counts, and
  for ExGRPO the rows then replaced by replayed trajectories are counted apart (`replayed`), so that
  `generated - replayed` is the fresh rollouts used;
- the distinct questions trained on (`questions`): the prompts the trainer receives from its sampler, or, for a
  trainer that says what it trained on (ExGRPO's `_fresh_questions` and `_replay_counts`), its own counts;
- the settings the run resolved to (`config`: beta, the FlowRL objective's fields, ...), the wall time of training
  (evaluation excluded) and of evaluation, and the saved final model.

Runs are cached in `cache_dir`, keyed by everything that determines them (the recipe file, every override, the
evaluation settings, the Python source of `trl_flowrl`, a digest of the files of the model trained, embedded or not,
and `RUN_FORMAT`, to bump when the tracking changes what a run measures): benchmarks that need the same run (GRPO
in benchmarks 2 and 3, the final models in benchmark 4) train it once. A record read from the cache says so
(`"cached": true`) and keeps the wall times it was measured with. `--no-cache` trains every run again.

Not handled: several processes (the evaluation runs on the main process only and the counters are per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from arms import ARMS, TRAINER_NAMES
from heldout import EvalSpec, HeldOutTracker, tracking_callback
from metrics import question_counts
from reporting import machine, write_json

from trl_flowrl._compat import package_versions


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "configs" / "embedded"
DEFAULT_CACHE = REPO / "outputs" / "benchmarks" / "runs"
RUN_FORMAT = 3  # bump when the tracking changes what a run records (3: training seconds at each point)
# Prefixes of the logged metrics a run record keeps, step by step.
TRAIN_LOG_PREFIXES = ("replay/", "flowrl/")
# The resolved settings a run records (those its trainer has).
RECORDED_SETTINGS = (
    "beta",
    "loss_type",
    "scale_rewards",
    "use_bias_correction_kl",
    "objective",
    "residual_normalization",
    "reward_in_residual",
    "log_z_estimate",
    "importance_weight_clipping",
    "replay_share",
    "replay_sampling",
    "replay_importance_weight",
    "replay_ratio",
    "replay_policy_shaping",
    "replay_importance_correction",
    "question_selection",
    "trajectory_selection",
    "displaced_questions",
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "max_completion_length",
    "temperature",
)

if str(REPO) not in sys.path:  # run from a source checkout: use its trl_flowrl
    sys.path.insert(0, str(REPO))


def _trainer_classes(name: str):
    from trl import GRPOConfig, GRPOTrainer

    from trl_flowrl import ExGRPOConfig, ExGRPOTrainer, FlowRLConfig, FlowRLTrainer

    classes = {
        "grpo": (GRPOTrainer, GRPOConfig),
        "flowrl": (FlowRLTrainer, FlowRLConfig),
        "exgrpo": (ExGRPOTrainer, ExGRPOConfig),
    }
    if name not in classes:
        raise ValueError(f"Unknown trainer {name!r}: use one of {TRAINER_NAMES}.")
    return classes[name]


def recipe_path(name: str) -> Path:
    return RECIPES / f"{name}_arithmetic.yaml"


def _counting(trainer_cls):
    """`trainer_cls` with counters of the rows TRL generates, of those ExGRPO replaces by replayed trajectories, and of
    the distinct questions its sampler hands to it (at the input of `_generate_and_score_completions`)."""
    from trl_flowrl.exgrpo.exgrpo_trainer import prompt_question_id

    class Counting(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rollouts_generated = 0
            self.rollouts_replayed = 0
            self.questions_sampled: set[str] = set()

        def _generate_and_score_completions(self, inputs):
            if self.model.training:
                self.questions_sampled.update(prompt_question_id(row["prompt"]) for row in inputs)
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            if self.model.training:
                self.rollouts_generated += len(completion_ids)
                # ExGRPO substitutes these rows (generated, then discarded) by stored trajectories.
                self.rollouts_replayed += len(getattr(self, "_replay_plan", None) or {})
            return completion_ids, logprobs

        def question_counts(self) -> dict:
            return question_counts(
                self.questions_sampled, getattr(self, "_fresh_questions", None), getattr(self, "_replay_counts", None)
            )

    Counting.__name__ = Counting.__qualname__ = f"Counting{trainer_cls.__name__}"
    return Counting


# Modules a run of the arithmetic task never executes: editing them keeps the cached runs.
_UNUSED_BY_RUNS = (
    "trl_flowrl/rewards/code_reward.py",
    "trl_flowrl/rewards/code_sandbox.py",
    "trl_flowrl/rewards/_sandbox_boot.py",
    "trl_flowrl/rewards/remote_executor.py",
    "trl_flowrl/tasks/programming.py",
    "trl_flowrl/data/code_datasets.py",
    "trl_flowrl/evaluation/judge.py",
)


def _code_of(path: Path) -> str:
    """A Python file's code without its docstrings and comments (the AST), so documentation edits keep the cache."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def source_digest(trainer: str, skip_unused_by_arithmetic: bool = True) -> str:
    """SHA-256 of the code of `trl_flowrl` that a run of `trainer` executes (its Python files' ASTs, docstrings left
    out, without the other trainers' subpackages, nor, by default, the modules a run of the arithmetic task never
    executes; the model a run trains is keyed on its own)."""
    import trl_flowrl

    # The package this process imported, which need not be this checkout's: a checkout beside an editable install of
    # another one imports that one (the benchmark modules import trl_flowrl before the path above takes effect).
    package = Path(trl_flowrl.__file__).resolve().parent
    other_trainers = [f"trl_flowrl/{name}/" for name in ("flowrl", "exgrpo") if name != trainer]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        name = str(path.relative_to(package.parent))
        if (skip_unused_by_arithmetic and name in _UNUSED_BY_RUNS) or any(
            name.startswith(prefix) for prefix in other_trainers
        ):
            continue
        digest.update(name.encode())
        digest.update(_code_of(path).encode())
    return digest.hexdigest()


def files_digest(directory: Path) -> str:
    """SHA-256 of every file under `directory` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# Settings that name places or control output only: they do not change what a run trains.
_UNKEYED_SETTINGS = ("output_dir", "logging_dir", "run_name", "disable_tqdm", "hub_model_id", "report_to")


def _resolved_settings(script_args, training_args) -> dict:
    """Every resolved setting of a run that can change what it trains (JSON-ready)."""
    settings = {k: v for k, v in training_args.to_dict().items() if k not in _UNKEYED_SETTINGS}
    settings.update({f"recipe.{k}": v for k, v in asdict(script_args).items()})
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _run_key(trainer: str, settings: dict, spec: EvalSpec, model: dict) -> str:
    payload = {
        "format": RUN_FORMAT,
        "trainer": trainer,
        "settings": settings,
        "eval": asdict(spec),
        "source": source_digest(trainer),
        "model": model["digest"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_identity(model_path: str | os.PathLike | None) -> dict:
    """The model a run trains (None: the embedded one): its directory and a digest of its files.

    Only this model keys a run, not the package's other assets (regenerating another task's embedded model keeps the
    cached runs).
    """
    from trl_flowrl.tasks import embedded_model_path

    embedded = Path(embedded_model_path()).resolve()
    path = embedded if model_path is None else Path(model_path).resolve()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model_path must be a local model directory (with a config.json), got {model_path!r}: the benchmarks "
            "run offline, and the run cache needs the model's files to key the run."
        )
    return {"path": str(path), "embedded": path == embedded, "digest": files_digest(path)}


def _check_expected(arm_name: str, training_args, extra_overrides: Sequence[str]) -> None:
    """Refuse a run whose settings are not those its arm stands for (unless the caller overrode them on purpose)."""
    named = {flag[2:].split("=", 1)[0] for flag in extra_overrides if flag.startswith("--")}
    for key, expected in ARMS[arm_name].expect.items():
        actual = getattr(training_args, key)
        if key not in named and actual != expected:
            raise ValueError(
                f"Arm {arm_name!r} stands for {key}={expected!r}, but its recipe "
                f"{recipe_path(ARMS[arm_name].trainer).relative_to(REPO)} with the arm's overrides gives {actual!r}: "
                f"add --{key} to the arm's overrides in ARMS (benchmarks/arms.py)."
            )


def tracked_run(
    arm: str,
    seed: int,
    steps: int,
    spec: EvalSpec,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    use_cache: bool = True,
    log=print,
    extra_overrides: Sequence[str] = (),
    model_path: str | os.PathLike | None = None,
) -> dict:
    """Train the arm `arm` of `ARMS` for `steps` steps with seed `seed`, tracked by `spec`.

    `extra_overrides` (command-line flags of the recipe, e.g. `["--num_train_problems", "800"]`) come after the arm's
    own. `model_path`: a local model directory to train instead of the embedded model, with the embedded recipe's
    settings (not through `--model_name_or_path`, which would make the recipe parser skip the embedded config).
    Returns the run record (see the module docstring); its `model_dir` holds the final policy.
    """
    import torch
    from transformers import AutoTokenizer, PrinterCallback

    from trl_flowrl.recipe import _build_reward, _load_dataset, parse_recipe_args

    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}: use one of {list(ARMS)} (or add it to ARMS).")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    for flag in extra_overrides:
        if flag.split("=", 1)[0] in ("--model_name_or_path", "--config"):
            raise ValueError(
                f"extra_overrides may not hold {flag!r}: pass the model as model_path (the run keeps the embedded "
                "recipe's settings), and change a setting with its own flag."
            )
    spec_arm = ARMS[arm]
    trainer_cls, config_cls = _trainer_classes(spec_arm.trainer)
    overrides = [
        "--seed",
        str(seed),
        "--max_steps",
        str(steps),
        "--disable_tqdm",
        "true",
        *spec_arm.overrides,
        *extra_overrides,
    ]
    model = _model_identity(model_path)
    # The key is the resolved settings, not the command line: editing the recipe file in a way that leaves a run's
    # settings as they were keeps the cached run.
    script_args, training_args, _ = parse_recipe_args(
        config_cls, recipe_path(spec_arm.trainer), argv=[*overrides, "--output_dir", "unset"]
    )
    _check_expected(arm, training_args, extra_overrides)
    settings = _resolved_settings(script_args, training_args)
    run_dir = Path(cache_dir) / f"{arm}-seed{seed}-steps{steps}-{_run_key(spec_arm.trainer, settings, spec, model)}"
    described = f"{spec_arm.label} seed {seed}" + "".join(f" {flag}" for flag in extra_overrides)
    if not model["embedded"]:
        described += f" (model {model['path']})"
    record_path = run_dir / "run.json"
    if use_cache and record_path.is_file() and (run_dir / "model" / "config.json").is_file():
        record = json.loads(record_path.read_text())
        record["cached"] = True
        log(f"{described}: reusing the cached run {run_dir}")
        return record
    training_args.output_dir = str(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model["path"])
    dataset = _load_dataset(script_args, training_args.seed)
    tracker = HeldOutTracker(
        spec,
        tokenizer,
        training_args.max_completion_length,
        training_args.temperature,
        dataset["terms"] if spec.validation_problems else (),
    )
    trainer = _counting(trainer_cls)(
        model=model["path"],
        reward_funcs=[_build_reward(script_args)],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    curve: list[dict] = []
    trainer.add_callback(tracking_callback(tracker, trainer, curve, log))

    log(f"{described}: {steps} steps, evaluated every {spec.every} ({run_dir.name})")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(training_args.output_dir)
    history = [
        {"step": entry["step"], "reward": entry["reward"]} for entry in trainer.state.log_history if "reward" in entry
    ]
    # The trainer's own per-step figures that the benchmarks report (ExGRPO's replay metrics, FlowRL's residual).
    logged = [
        {"step": entry["step"], **{k: v for k, v in entry.items() if k.startswith(TRAIN_LOG_PREFIXES)}}
        for entry in trainer.state.log_history
        if any(k.startswith(TRAIN_LOG_PREFIXES) for k in entry)
    ]
    record = {
        "format": RUN_FORMAT,
        "arm": arm,
        "label": spec_arm.label,
        "trainer": spec_arm.trainer,
        "seed": seed,
        "steps": steps,
        "recipe": str(recipe_path(spec_arm.trainer).relative_to(REPO)),
        "arm_overrides": list(spec_arm.overrides),
        "extra_overrides": list(extra_overrides),
        "overrides": overrides,
        "model": model,
        "config": {key: getattr(training_args, key) for key in RECORDED_SETTINGS if hasattr(training_args, key)},
        "num_train_problems": len(dataset),
        "eval": asdict(spec),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "train_seconds": wall - tracker.seconds,
        "eval_seconds": tracker.seconds,
        "seconds_per_step": (wall - tracker.seconds) / steps,
        "rollouts_generated": trainer.rollouts_generated,
        "rollouts_replayed": trainer.rollouts_replayed,
        "fresh_rollouts_used": trainer.rollouts_generated - trainer.rollouts_replayed,
        "questions": trainer.question_counts(),
        "curve": curve,
        "train_reward": history,
        "train_log": logged,
        "model_dir": str(run_dir / "model"),
        "cached": False,
    }
    if spec_arm.trainer == "exgrpo":
        buffer = trainer.replay_buffer
        record["replay"] = {
            "started": buffer.replay_started,
            "buffer_questions": buffer.num_questions,
            "buffer_trajectories": buffer.num_trajectories,
            "retired_questions": buffer.num_retired,
        }
    write_json(record_path, record)
    log(
        f"{described}: trained in {record['train_seconds'] / 60:.1f} min ({record['seconds_per_step']:.2f} s/step) on "
        f"{record['questions']['distinct_questions']} distinct questions, evaluation {tracker.seconds / 60:.1f} min"
    )
    del trainer
    return record


def run_summary(record: dict) -> dict:
    """A run record without its model path, for the benchmark's JSON."""
    return {key: value for key, value in record.items() if key != "model_dir"}
