"""The held-out tracking of a training run on the embedded arithmetic task (see `runs.tracked_run`).

`EvalSpec` says how a run is tracked; `HeldOutTracker` measures the policy; `tracking_callback` measures it on the main
process at step 0 and every `spec.every` steps (and at the last step), and appends each point to the run's curve:
held-out accuracy (avg@k), pass@k, distinct correct paths per problem, entropy over the correct paths, and how far the
policy's distribution over each problem's enumerated correct paths is from the reference model's (see
`metrics.path_distribution_distance`; the reference is the model measured at step 0), with the rollouts generated and
the distinct questions trained on so far.

The held-out evaluation samples `spec.num_samples` completions for each of `spec.num_problems` held-out problems
(`trl_flowrl.evaluation.arithmetic_benchmark`, the same problems for every run), with the training temperature and
no top-p, under a fixed sampling seed (every run and every step draws the same random numbers), and grades them with
`trl_flowrl.evaluation.score_samples`, i.e. with the project's math reward and exact path ids.

With `spec.validation_problems > 0` the tracker also measures, at step 0 and at the last step only, a *validation*
split that is neither the training set nor the held-out set: train-split problems of the task (so possibly seen in
pre-training, like every training problem) that are not in the run's own training set (`validation_benchmark`). The
benchmarks choose learning rates on it, so that nothing is chosen on the held-out problems.

Not handled: several processes (the evaluation runs on the main process only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from metrics import mean_distance, path_distribution_distance


@dataclass(frozen=True)
class EvalSpec:
    """How a run is tracked: `num_problems` held-out problems x `num_samples` samples every `every` steps."""

    num_problems: int = 64
    num_samples: int = 16
    every: int = 25
    problem_seed: int = 0
    sampling_seed: int = 0
    batch_size: int = 512
    validation_problems: int = 0  # 0: no validation split (see the module docstring)

    def __post_init__(self):
        if min(self.num_problems, self.num_samples, self.every, self.batch_size) < 1:
            raise ValueError(f"Every size of the evaluation must be >= 1, got {self}.")
        if self.validation_problems < 0:
            raise ValueError(f"validation_problems must be >= 0, got {self.validation_problems}.")


def validation_benchmark(num_problems: int, training_terms, seed: int = 0):
    """`num_problems` train-split arithmetic problems outside the training set (`training_terms`: the terms of every
    training problem), as a `Benchmark` graded like the held-out one; the same problems for every run that trains on
    the same set. Raises ValueError when the train split has too few problems left."""
    from trl_flowrl.evaluation import Benchmark, arithmetic_benchmark
    from trl_flowrl.tasks import generate_problems

    trained = {tuple(sorted(terms)) for terms in training_terms}
    held_out = arithmetic_benchmark(num_problems=1)  # its grader, path ids and generation length
    try:
        candidates = generate_problems(num_problems + len(trained), seed=f"validation-{seed}", split="train")
    except ValueError as error:
        raise ValueError(
            f"Too few train-split problems outside the training set for {num_problems}: {error}"
        ) from None
    problems = [p for p in candidates if tuple(sorted(p.terms)) not in trained][:num_problems]
    if len(problems) < num_problems:
        raise ValueError(f"Only {len(problems)} train-split problems lie outside the training set; ask for fewer.")
    rows = [{"prompt": p.prompt, "solution": p.solution, "terms": list(p.terms)} for p in problems]
    return Benchmark(
        "arithmetic_validation",
        rows,
        held_out.grader,
        batched=True,
        path_id=held_out.path_id,
        max_new_tokens=held_out.max_new_tokens,
        description="train-split arithmetic problems outside the run's training set (for choosing settings)",
    )


class HeldOutTracker:
    """Measures the policy on the held-out problems (main process only); see the module docstring."""

    def __init__(self, spec: EvalSpec, tokenizer, max_new_tokens: int, temperature: float, training_terms=()):
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
        self.validation = (
            validation_benchmark(spec.validation_problems, training_terms) if spec.validation_problems else None
        )

    def _sample_and_score(self, model, benchmark):
        from trl_flowrl.evaluation import load_generator, score_samples

        generator = load_generator(
            model, tokenizer=self.tokenizer, backend="transformers", batch_size=self.spec.batch_size
        )
        samples = generator.generate(
            benchmark.prompts,
            num_samples=self.spec.num_samples,
            temperature=self.temperature,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            seed=self.spec.sampling_seed,
            progress=False,
        )
        return score_samples(benchmark, samples)

    def measure_validation(self, model) -> dict:
        """Accuracy (avg@k), pass@k and distinct correct paths on the validation split (`spec.num_samples` each)."""
        start = time.perf_counter()
        scored = self._sample_and_score(model, self.validation)
        self.seconds += time.perf_counter() - start
        return {
            "accuracy": scored["avg_at_k"],
            "pass_at_k": scored["pass_at_k"][str(self.spec.num_samples)],
            "distinct_correct_paths": scored["diversity"]["distinct_correct_paths"],
        }

    def measure(self, model, step: int, counters: dict) -> dict:
        from trl_flowrl.tasks import path_log_probs

        start = time.perf_counter()
        scored = self._sample_and_score(model, self.benchmark)
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


def tracking_callback(tracker: HeldOutTracker, trainer, curve: list, log):
    from transformers import TrainerCallback

    started = []  # when training began (after the step-0 measurement)

    def counters():
        generated, replayed = trainer.rollouts_generated, trainer.rollouts_replayed
        # The wall time spent training so far: since the start, less the measurements made since.
        elapsed = time.perf_counter() - started[0] - (tracker.seconds - started[1]) if started else 0.0
        return {
            "rollouts_generated": generated,
            "rollouts_replayed": replayed,
            "fresh_rollouts_used": generated - replayed,
            "distinct_questions": trainer.question_counts()["distinct_questions"],
            "train_seconds": round(elapsed, 3),
        }

    def measure(model, step, last=False):
        point = tracker.measure(model, step, counters())
        if tracker.validation is not None and (step == 0 or last):
            point["validation"] = tracker.measure_validation(model)
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
                started[:] = [time.perf_counter(), tracker.seconds]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            last = step == state.max_steps
            if state.is_world_process_zero and (step % tracker.spec.every == 0 or last):
                measure(model, step, last)

    return Track()
