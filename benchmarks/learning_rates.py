"""The learning-rate protocol of the benchmarks of the embedded task: each arm at its own best learning rate.

Papers compare methods each at its best learning rate; a squared-residual loss (FlowRL) need not suit the rate that
suits GRPO. So each arm chooses among `--learning-rates` (default 3e-5, 1e-4 and 3e-4, around the recipes' 1e-4) on a
*validation* split that is neither the training set nor the held-out set (`heldout.validation_benchmark`: train-split
problems outside the run's training set), with the same budget for every arm: one run per rate with the first seed,
as many steps as the benchmark's runs. The rate whose run ends with the best validation accuracy (avg@k) wins; the other
seeds run at it. The first seed's run at the chosen rate is one of the arm's runs: its held-out figures played no part
in the choice. A benchmark that reuses another's runs (benchmark 4 reads benchmark 2's) runs the same protocol with the
same options and finds every run in the cache.
"""

from dataclasses import replace

from arms import LABELS


LEARNING_RATES = "3e-5,1e-4,3e-4"


def option_runner(args, spec):
    """`run(arm, seed, overrides)` for `learning_rate_protocol`: `runs.tracked_run` with the benchmark's steps, its
    tracking `spec` and its cache options."""
    from runs import tracked_run

    def run(name, seed, overrides):
        return tracked_run(
            name,
            seed,
            args.steps,
            spec,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            extra_overrides=overrides,
        )

    return run


def add_learning_rate_arguments(parser) -> None:
    parser.add_argument(
        "--learning-rates",
        default=LEARNING_RATES,
        help="comma-separated learning rates each arm chooses among on the validation split (default: "
        f"{LEARNING_RATES}); one value: every arm at it, no choice",
    )
    parser.add_argument(
        "--validation-problems",
        type=int,
        default=64,
        help="validation problems (train split, outside the training set) the choice is made on (default 64)",
    )


def resolve_learning_rates(parser, args, spec):
    """The sorted learning rates, and `spec` with the validation split (`--smoke`: 2 rates, 2 problems)."""
    if args.smoke:
        args.learning_rates, args.validation_problems = "1e-4,3e-4", 2
    try:
        rates = sorted({float(x) for x in args.learning_rates.split(",") if x.strip()})
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        parser.error(f"--learning-rates must list positive numbers, got {args.learning_rates!r}.")
    if args.validation_problems < 1:
        parser.error(f"--validation-problems must be >= 1, got {args.validation_problems}.")
    return rates, replace(spec, validation_problems=args.validation_problems)


def choose_learning_rate(sweep: dict[float, dict]) -> float:
    """The learning rate whose run ends with the best validation accuracy (the smaller one on a tie)."""
    return max(sorted(sweep), key=lambda lr: sweep[lr]["curve"][-1]["validation"]["accuracy"])


def learning_rate_protocol(arms, seeds, learning_rates, run) -> tuple[dict, dict, dict]:
    """Each arm's learning rate chosen on the validation split, then its runs at that rate.

    For every arm, one run per learning rate with the first seed (the same budget for every arm); the rate whose run
    ends with the best validation accuracy is chosen; the other seeds then run at it, and the first seed's run at it
    is reused (its held-out figures played no part in the choice). `run(arm, seed, overrides)` trains one run.
    Returns the sweep (arm -> rate -> run), the chosen rates and the runs (arm -> one run per seed).
    """
    sweep = {name: {lr: run(name, seeds[0], ("--learning_rate", f"{lr:g}")) for lr in learning_rates} for name in arms}
    chosen = {name: choose_learning_rate(sweep[name]) for name in arms}
    runs = {name: [sweep[name][chosen[name]]] for name in arms}
    for seed in seeds[1:]:  # interleaved, so that a slow spell of the machine does not fall on one arm
        for name in arms:
            runs[name].append(run(name, seed, ("--learning_rate", f"{chosen[name]:g}")))
    return sweep, chosen, runs


def print_sweep(sweep: dict, chosen: dict) -> None:
    """Each arm's validation accuracy at the end of its run at every rate, the chosen one marked."""
    print("\nValidation accuracy (avg@k, %) at the end of training, by learning rate (first seed):")
    for name, by_rate in sweep.items():
        cells = ", ".join(
            f"{lr:g}: {100 * r['curve'][-1]['validation']['accuracy']:.1f}{' (chosen)' if lr == chosen[name] else ''}"
            for lr, r in by_rate.items()
        )
        print(f"  {LABELS[name]}: {cells}")


def choice_report(sweep: dict, chosen: dict) -> dict:
    """What a report keeps of the choice, per arm: the chosen rate, each rate's validation figures at the end (and
    at the start), its held-out accuracy at the end (shown, never used to choose) and its seconds."""
    return {
        name: {
            "chosen": chosen[name],
            "validation": {f"{lr:g}": r["curve"][-1]["validation"] for lr, r in by_rate.items()},
            "validation_initial": next(iter(by_rate.values()))["curve"][0]["validation"],
            "held_out_final": {f"{lr:g}": r["curve"][-1]["accuracy"] for lr, r in by_rate.items()},
            "seconds": {
                f"{lr:g}": {"train": r["train_seconds"], "eval": r["eval_seconds"]} for lr, r in by_rate.items()
            },
        }
        for name, by_rate in sweep.items()
    }
