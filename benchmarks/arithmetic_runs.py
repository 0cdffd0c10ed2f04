"""Training runs on the embedded arithmetic task, tracked on a fixed held-out set: shared by benchmarks 2, 3 and 4.

`tracked_run(arm, seed, steps, spec)` trains one *arm* of `ARMS`: a trainer (GRPO, FlowRL or ExGRPO) with exactly the
settings of the recipes' embedded config (`recipes/configs/embedded/<trainer>_arithmetic.yaml`, read with
`trl_flowrl.recipe.parse_recipe_args`) plus the arm's own command-line overrides (e.g. `--beta 0.0667` for GRPO with
a KL term); the seed, the number of steps and the output directory are set per run, progress bars turned off. A
caller may add overrides (`extra_overrides`, e.g. `--num_train_problems 800`) and train another model than the
embedded one (`model_path`; the embedded recipe's settings are kept). It returns a record of the run:

- a curve measured by a callback on the main process at step 0 and every `spec.every` steps: held-out accuracy
  (avg@k), pass@k, distinct correct paths per problem, entropy over the correct paths, and how far the policy's
  distribution over each problem's enumerated correct paths is from the reference model's (see
  `path_distribution_distance`), with the rollouts generated and the distinct questions trained on so far;
- the rollouts each trainer actually generates, counted at TRL's generation call: every row it generates counts, and
  for ExGRPO the rows then replaced by replayed trajectories are counted apart (`replayed`), so that
  `generated - replayed` is the fresh rollouts used;
- the distinct questions trained on (`questions`): the prompts the trainer receives from its sampler, or, for a
  trainer that says what it trained on (ExGRPO's `_fresh_questions` and `_replay_counts`), its own counts;
- the settings the run resolved to (`config`: beta, the FlowRL objective's fields, ...), the wall time of training
  (evaluation excluded) and of evaluation, and the saved final model.

The held-out evaluation samples `spec.num_samples` completions for each of `spec.num_problems` held-out problems
(`trl_flowrl.evaluation.arithmetic_benchmark`, the same problems for every run), with the training temperature and
no top-p, under a fixed sampling seed (every run and every step draws the same random numbers), and grades them with
`trl_flowrl.evaluation.score_samples`, i.e. with the project's math reward and exact path ids.

Runs are cached in `cache_dir`, keyed by everything that determines them (the recipe file, every override, the
evaluation settings, the Python source of `trl_flowrl`, a digest of the files of the model trained, embedded or not,
and `RUN_FORMAT`, to bump when the tracking below changes what a run measures): benchmarks that need the same run (GRPO
in benchmarks 2 and 3, the final models in benchmark 4) train it once. A record read from the cache says so
(`"cached": true`) and keeps the wall times it was measured with. `--no-cache` trains every run again.

Not handled: several processes (the evaluation runs on the main process only and the counters are per process).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl_flowrl._compat import package_versions


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "configs" / "embedded"
TRAINER_NAMES = ("grpo", "flowrl", "exgrpo")
DEFAULT_CACHE = REPO / "outputs" / "benchmarks" / "runs"
RUN_FORMAT = 2  # bump when the tracking changes what a run records


@dataclass(frozen=True)
class Arm:
    """One configuration the benchmarks compare: a trainer of `TRAINER_NAMES`, the command-line overrides it adds to
    that trainer's embedded recipe, and how tables and plots name it.

    `expect` lists the resolved settings the arm stands for; a run checks them after parsing, so that a change of the
    embedded recipe (e.g. its FlowRL objective) cannot silently change what an arm measures.
    """

    trainer: str
    overrides: tuple[str, ...]
    label: str
    color: str
    expect: Mapping[str, object] = field(default_factory=dict)


# The resolved FlowRL settings of each objective, as the arms below stand for them.
OFFICIAL = {
    "objective": "official",
    "residual_normalization": "token_mean",
    "reward_in_residual": "advantage",
    "log_z_estimate": "head",
}
MATCHING = {
    "objective": "matching",
    "residual_normalization": "length",
    "reward_in_residual": "reward",
    "log_z_estimate": "group",
}
# ExGRPO at the paper's defaults, which the ExGRPO arms change one at a time.
PAPER_EXGRPO = {
    "replay_ratio": 0.5,
    "replay_policy_shaping": True,
    "replay_importance_correction": True,
    "question_selection": "gaussian",
    "trajectory_selection": "lowest_entropy",
    "displaced_questions": "drop",
}
# GRPO + KL: with the advantage as reward term and beta = 15, the official FlowRL objective's per-sample gradient is
# GRPO's plus a squared log-ratio pull toward the reference of weight about 1/beta, so GRPO with a KL coefficient of
# 1/15 is its fair baseline (TRL's default KL estimator, use_bias_correction_kl and loss_type unchanged).
# The FlowRL arms name their objective and beta, so that they do not depend on what the embedded recipe uses.
ARMS = {
    "grpo": Arm("grpo", (), "GRPO", "tab:blue", {"beta": 0.0}),
    "grpo_kl": Arm("grpo", ("--beta", "0.0667"), "GRPO + KL (beta 1/15)", "tab:cyan", {"beta": 0.0667}),
    "flowrl": Arm(
        "flowrl",
        ("--objective", "official", "--beta", "15"),
        "FlowRL official (beta 15)",
        "tab:orange",
        {**OFFICIAL, "beta": 15.0},
    ),
    "flowrl_matching": Arm(
        "flowrl",
        ("--objective", "matching", "--beta", "15"),
        "FlowRL matching (beta 15)",
        "tab:red",
        {**MATCHING, "beta": 15.0},
    ),
    # the trade-off: a sharper target (correct/wrong odds e^15 times the reference's), slower matching among paths
    "flowrl_matching_b5": Arm(
        "flowrl",
        ("--objective", "matching", "--beta", "5"),
        "FlowRL matching (beta 5)",
        "tab:purple",
        {**MATCHING, "beta": 5.0},
    ),
    "exgrpo": Arm("exgrpo", (), "ExGRPO", "tab:green", PAPER_EXGRPO),
    "exgrpo_no_replay": Arm(
        "exgrpo",
        ("--replay_ratio", "0.0"),
        "ExGRPO, replay_ratio 0",
        "tab:olive",
        {**PAPER_EXGRPO, "replay_ratio": 0.0},
    ),
    # The paper's ablations (its in-distribution averages on Qwen2.5-Math-7B in the labels' docs: README), and the
    # requeue departure.
    "exgrpo_no_shaping": Arm(
        "exgrpo",
        ("--replay_policy_shaping", "false"),
        "ExGRPO without policy shaping",
        "tab:brown",
        {**PAPER_EXGRPO, "replay_policy_shaping": False},
    ),
    "exgrpo_no_is": Arm(
        "exgrpo",
        ("--replay_importance_correction", "false"),
        "ExGRPO without importance correction",
        "tab:pink",
        {**PAPER_EXGRPO, "replay_importance_correction": False},
    ),
    "exgrpo_uniform_questions": Arm(
        "exgrpo",
        ("--question_selection", "uniform"),
        "ExGRPO without question selection",
        "tab:gray",
        {**PAPER_EXGRPO, "question_selection": "uniform"},
    ),
    "exgrpo_random_trajectory": Arm(
        "exgrpo",
        ("--trajectory_selection", "random"),
        "ExGRPO without trajectory selection",
        "black",
        {**PAPER_EXGRPO, "trajectory_selection": "random"},
    ),
    "exgrpo_requeue": Arm(
        "exgrpo",
        ("--displaced_questions", "requeue"),
        "ExGRPO, displaced questions requeued",
        "goldenrod",
        {**PAPER_EXGRPO, "displaced_questions": "requeue"},
    ),
}
LABELS = {name: arm.label for name, arm in ARMS.items()}
COLORS = {name: arm.color for name, arm in ARMS.items()}
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


@dataclass(frozen=True)
class EvalSpec:
    """How a run is tracked: `num_problems` held-out problems x `num_samples` samples every `every` steps."""

    num_problems: int = 64
    num_samples: int = 16
    every: int = 25
    problem_seed: int = 0
    sampling_seed: int = 0
    batch_size: int = 512

    def __post_init__(self):
        if min(self.num_problems, self.num_samples, self.every, self.batch_size) < 1:
            raise ValueError(f"Every size of the evaluation must be >= 1, got {self}.")


# -- pure functions ------------------------------------------------------------------------------------------------


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def path_distribution_distance(policy_logps: Mapping[str, float], reference_logps: Mapping[str, float]) -> dict:
    """How far a policy's distribution over a problem's valid paths is from the reference model's.

    Both arguments map each enumerated valid path of one problem to its summed log-probability (as
    `trl_flowrl.tasks.path_log_probs` returns them). All valid paths are correct and earn the same reward, so FlowRL's
    target `p*(y) ∝ π_ref(y) exp(β r(y))`, restricted to them, is the reference renormalised over them. With
    `q = π_θ / Σ π_θ` and `p = π_ref / Σ π_ref` over the paths:

    - `tv`: total variation `½ Σ |q - p|`, in [0, 1];
    - `kl`: `KL(q || p) = Σ q log(q / p)` (nats), the direction FlowRL minimises;
    - `kl_reverse`: `KL(p || q)` (nats), large when the policy drops paths the target keeps;
    - `policy_mass`, `reference_mass`: `Σ π` over the valid paths (the rest is on other completions);
    - `policy_entropy`, `reference_entropy`: entropies (nats) of `q` and `p`;
    - `policy_top`, `reference_top`: the largest probability of `q` and of `p` (1 for a collapsed distribution);
    - `policy_on_reference_top`: `q` of the reference's likeliest path (ties: the first path id in sorted order).

    Raises ValueError when the two do not hold the same paths or hold none.
    """
    if not policy_logps or set(policy_logps) != set(reference_logps):
        raise ValueError(
            "The policy and the reference must give log-probabilities for the same, non-empty set of paths; got "
            f"{sorted(policy_logps)} and {sorted(reference_logps)}."
        )
    keys = sorted(policy_logps)
    log_q_total = _log_sum_exp([policy_logps[k] for k in keys])
    log_p_total = _log_sum_exp([reference_logps[k] for k in keys])
    log_q = [policy_logps[k] - log_q_total for k in keys]
    log_p = [reference_logps[k] - log_p_total for k in keys]
    q = [math.exp(v) for v in log_q]
    p = [math.exp(v) for v in log_p]
    return {
        "tv": 0.5 * sum(abs(a - b) for a, b in zip(q, p)),
        "kl": sum(a * (la - lb) for a, la, lb in zip(q, log_q, log_p) if a > 0),
        "kl_reverse": sum(b * (lb - la) for b, la, lb in zip(p, log_q, log_p) if b > 0),
        "policy_mass": math.exp(log_q_total),
        "reference_mass": math.exp(log_p_total),
        "policy_entropy": -sum(a * la for a, la in zip(q, log_q) if a > 0),
        "reference_entropy": -sum(b * lb for b, lb in zip(p, log_p) if b > 0),
        "policy_top": max(q),
        "reference_top": max(p),
        "policy_on_reference_top": q[p.index(max(p))],
    }


def mean_distance(distances: Sequence[Mapping[str, float]]) -> dict:
    """The per-key mean of `path_distribution_distance` results over problems."""
    if not distances:
        raise ValueError("Need at least one problem's distances.")
    return {key: sum(d[key] for d in distances) / len(distances) for key in distances[0]}


def rollouts_to_reach(rollouts: Sequence[float], accuracies: Sequence[float], threshold: float) -> float | None:
    """Rollouts at which an accuracy curve first reaches `threshold`, interpolated linearly between the two
    evaluation points around the first crossing; the first point's rollouts if it is already there; None if never.

    `rollouts` must be increasing, with one accuracy per point.
    """
    if len(rollouts) != len(accuracies) or not rollouts:
        raise ValueError(f"Need one accuracy per point, got {len(rollouts)} points and {len(accuracies)} accuracies.")
    if any(b <= a for a, b in zip(rollouts, rollouts[1:])):
        raise ValueError("rollouts must be strictly increasing.")
    for i, accuracy in enumerate(accuracies):
        if accuracy >= threshold:
            if i == 0:
                return float(rollouts[0])
            x0, x1, y0, y1 = rollouts[i - 1], rollouts[i], accuracies[i - 1], accuracies[i]
            return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))
    return None


def mean_curve(curves: Sequence[Sequence[Mapping]], key: str) -> list[float]:
    """The mean over runs of `point[key]` at each evaluation point (runs must share their evaluation steps)."""
    steps = [[point["step"] for point in curve] for curve in curves]
    if not curves or any(s != steps[0] for s in steps):
        raise ValueError("The runs must have been evaluated at the same steps.")
    return [sum(curve[i][key] for curve in curves) / len(curves) for i in range(len(steps[0]))]


def parse_arms(text: str | None, default: Sequence[str]) -> list[str]:
    """The arms named by a comma-separated `--arms` value (None or empty: `default`), in the order given.

    Raises ValueError for an unknown or repeated name.
    """
    if not text or not text.strip():
        return list(default)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"--arms must list distinct arms of {list(ARMS)}, got {text!r}.")
    return names


def question_counts(
    sampled: set[str], fresh: set[str] | None = None, replays: Mapping[str, int] | None = None
) -> dict:
    """Distinct questions a run trained on.

    `sampled`: the question ids the trainer received from its sampler. `fresh` and `replays`: what the trainer says it
    trained on, when it does (ExGRPO: fresh questions, and replays per question), which then decides
    `distinct_questions` (`source` "trainer"); otherwise the sampled ids do (`source` "sampler").
    """
    counts = {"distinct_questions_sampled": len(sampled)}
    if fresh is None:
        return {"distinct_questions": len(sampled), **counts, "source": "sampler"}
    replays = replays or {}
    return {
        "distinct_questions": len(set(fresh) | set(replays)),
        **counts,
        "distinct_fresh_questions": len(fresh),
        "distinct_replayed_questions": len(replays),
        "replays": sum(replays.values()),
        "max_replays_per_question": max(replays.values(), default=0),
        "source": "trainer",
    }


# -- environment ---------------------------------------------------------------------------------------------------


def machine() -> str:
    """The CPU model and core count, as every benchmark reports it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def report_header(benchmark: str, smoke: bool, settings: dict) -> dict:
    import torch

    return {
        "benchmark": benchmark,
        "smoke": smoke,
        "date": time.strftime("%Y-%m-%d"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "settings": settings,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def quiet() -> None:
    """Offline, one torch thread unless set otherwise, and no per-step chatter from transformers/TRL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


# -- training with tracking ----------------------------------------------------------------------------------------


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


def _source_digest(trainer: str) -> str:
    """SHA-256 of the code of `trl_flowrl` that a run of `trainer` executes (its Python files' ASTs, docstrings left
    out, without the other trainers' subpackages; the model a run trains is keyed on its own)."""
    other_trainers = [f"trl_flowrl/{name}/" for name in ("flowrl", "exgrpo") if name != trainer]
    digest = hashlib.sha256()
    for path in sorted((REPO / "trl_flowrl").rglob("*.py")):
        name = str(path.relative_to(REPO))
        if name in _UNUSED_BY_RUNS or any(name.startswith(prefix) for prefix in other_trainers):
            continue
        digest.update(name.encode())
        digest.update(_code_of(path).encode())
    return digest.hexdigest()


def _files_digest(directory: Path) -> str:
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
        "source": _source_digest(trainer),
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
    return {"path": str(path), "embedded": path == embedded, "digest": _files_digest(path)}


def _check_expected(arm_name: str, training_args, extra_overrides: Sequence[str]) -> None:
    """Refuse a run whose settings are not those its arm stands for (unless the caller overrode them on purpose)."""
    named = {flag[2:].split("=", 1)[0] for flag in extra_overrides if flag.startswith("--")}
    for key, expected in ARMS[arm_name].expect.items():
        actual = getattr(training_args, key)
        if key not in named and actual != expected:
            raise ValueError(
                f"Arm {arm_name!r} stands for {key}={expected!r}, but its recipe "
                f"{recipe_path(ARMS[arm_name].trainer).relative_to(REPO)} with the arm's overrides gives {actual!r}: "
                f"add --{key} to the arm's overrides in ARMS (benchmarks/arithmetic_runs.py)."
            )


class HeldOutTracker:
    """Measures the policy on the held-out problems (main process only); see the module docstring."""

    def __init__(self, spec: EvalSpec, tokenizer, max_new_tokens: int, temperature: float):
        from trl_flowrl.evaluation import arithmetic_benchmark
        from trl_flowrl.tasks import ArithmeticProblem

        self.spec = spec
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.benchmark = arithmetic_benchmark(num_problems=spec.num_problems, seed=spec.problem_seed)
        self.problems = [ArithmeticProblem(tuple(row["terms"])) for row in self.benchmark.rows]
        self.reference_logps: list[dict[str, float]] | None = None
        self.seconds = 0.0

    def measure(self, model, step: int, counters: dict) -> dict:
        from trl_flowrl.evaluation import load_generator, score_samples
        from trl_flowrl.tasks import path_log_probs

        start = time.perf_counter()
        generator = load_generator(
            model, tokenizer=self.tokenizer, backend="transformers", batch_size=self.spec.batch_size
        )
        samples = generator.generate(
            self.benchmark.prompts,
            num_samples=self.spec.num_samples,
            temperature=self.temperature,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            seed=self.spec.sampling_seed,
            progress=False,
        )
        scored = score_samples(self.benchmark, samples)
        records = [record for problem in scored["samples"] for record in problem]
        logps = [path_log_probs(model, self.tokenizer, problem) for problem in self.problems]
        if self.reference_logps is None:  # the first measurement is of the initial model, the reference
            self.reference_logps = logps
        target = mean_distance(
            [path_distribution_distance(q, p) for q, p in zip(logps, self.reference_logps, strict=True)]
        )
        diversity = scored["diversity"]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return {
            "step": step,
            **counters,
            "accuracy": scored["avg_at_k"],
            "pass_at_k": scored["pass_at_k"][str(self.spec.num_samples)],
            "distinct_correct_paths": diversity["distinct_correct_paths"],
            "distinct_correct_paths_solved": diversity["distinct_correct_paths_solved"],
            "correct_path_entropy": diversity["correct_path_entropy"],
            "distinct_answers": diversity["distinct_answers"],
            "valid_path_rate": sum(r["path_id"] is not None for r in records) / len(records),
            "target": target,
            "seconds": round(seconds, 3),
        }


def _callback(tracker: HeldOutTracker, trainer, curve: list, log):
    from transformers import TrainerCallback

    def counters():
        generated, replayed = trainer.rollouts_generated, trainer.rollouts_replayed
        return {
            "rollouts_generated": generated,
            "rollouts_replayed": replayed,
            "fresh_rollouts_used": generated - replayed,
            "distinct_questions": trainer.question_counts()["distinct_questions"],
        }

    def measure(model, step):
        point = tracker.measure(model, step, counters())
        curve.append(point)
        log(
            f"  step {step:4d}: accuracy {100 * point['accuracy']:5.1f}%, distinct correct paths "
            f"{point['distinct_correct_paths']:.2f}, path entropy {point['correct_path_entropy'] or 0:.3f}, "
            f"TV to target {point['target']['tv']:.3f}, rollouts {point['rollouts_generated']} "
            f"({point['seconds']:.1f} s)"
        )

    class Track(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if state.is_world_process_zero and (step % tracker.spec.every == 0 or step == state.max_steps):
                measure(model, step)

    return Track()


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
    tracker = HeldOutTracker(spec, tokenizer, training_args.max_completion_length, training_args.temperature)
    trainer = _counting(trainer_cls)(
        model=model["path"],
        reward_funcs=[_build_reward(script_args)],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    curve: list[dict] = []
    trainer.add_callback(_callback(tracker, trainer, curve, log))

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


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and the values themselves."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": values}


# -- command line and plots shared by the benchmark scripts --------------------------------------------------------


def add_run_arguments(parser) -> None:
    """The options every benchmark of the embedded task takes (its own options come on top)."""
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (the recipes': 300)")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every this many steps")
    parser.add_argument("--eval-problems", type=int, default=64, help="held-out problems of the evaluation")
    parser.add_argument("--eval-samples", type=int, default=16, help="samples per held-out problem")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where runs are kept and reused")
    parser.add_argument("--no-cache", action="store_true", help="train every run again")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (smoke: outputs/...)")
    parser.add_argument(
        "--smoke", action="store_true", help="1 seed, 2 steps, 2 problems x 2 samples: checks that the script runs"
    )


def add_arms_argument(parser, default: Sequence[str]) -> None:
    """`--arms`: which arms of `ARMS` a benchmark trains (read it with `parse_arms`)."""
    parser.add_argument(
        "--arms",
        default=",".join(default),
        help=f"comma-separated arms, of {', '.join(ARMS)} (default: {','.join(default)})",
    )


def resolve_run_arguments(args) -> tuple[list[int], EvalSpec, Path]:
    """Seeds, evaluation settings and output directory from the parsed options (`--smoke` shrinks everything)."""
    import torch

    torch.set_num_threads(args.num_threads)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.eval_problems, args.eval_samples = "0", 2, 1, 2, 2
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers, got {args.seeds!r}.")
    spec = EvalSpec(num_problems=args.eval_problems, num_samples=args.eval_samples, every=args.eval_every)
    default = REPO / "outputs" / "benchmarks" / "smoke" if args.smoke else REPO / "benchmarks" / "results"
    return seeds, spec, Path(args.output_dir) if args.output_dir else default


def run_settings(args, seeds: list[int], spec: EvalSpec, arms: Sequence[str]) -> dict:
    return {
        "seeds": seeds,
        "steps": args.steps,
        "eval": asdict(spec),
        "eval_temperature": 1.0,
        "eval_top_p": 1.0,
        "arms": {
            name: {"trainer": ARMS[name].trainer, "overrides": list(ARMS[name].overrides), "label": ARMS[name].label}
            for name in arms
        },
        "recipes": {
            trainer: str(recipe_path(trainer).relative_to(REPO))
            for trainer in dict.fromkeys(ARMS[name].trainer for name in arms)
        },
    }


def run_summary(record: dict) -> dict:
    """A run record without its model path, for the benchmark's JSON."""
    return {key: value for key, value in record.items() if key != "model_dir"}


def plot_metric(ax, runs: dict[str, list[dict]], y, x="step", ylabel=None, xlabel=None) -> None:
    """Per-seed curves (thin) and their mean (thick) of each trainer; `y` is a key of a curve point or a function."""
    get = y if callable(y) else (lambda point: point[y])
    for name, records in runs.items():
        curves = [record["curve"] for record in records]
        for curve in curves:
            ax.plot([p[x] for p in curve], [get(p) for p in curve], color=COLORS[name], alpha=0.25, linewidth=0.8)
        xs = [sum(c[i][x] for c in curves) / len(curves) for i in range(len(curves[0]))]
        ys = [sum(get(c[i]) for c in curves) / len(curves) for i in range(len(curves[0]))]
        ax.plot(xs, ys, color=COLORS[name], linewidth=2, label=f"{LABELS[name]} (mean of {len(curves)})")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or (y if isinstance(y, str) else ""))
    ax.grid(alpha=0.3)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
