"""The command-line options that benchmarks 2, 3 and 4 share, and the settings they report from them.

`add_run_arguments` adds the seeds, steps, held-out evaluation, cache and output options (with `--smoke`, which
`resolve_run_arguments` turns into 1 seed, 2 steps and 2 problems x 2 samples), `add_arms_argument` and `parse_arms`
the `--arms` option, and `run_settings` the settings a benchmark's JSON records (seeds, steps, evaluation, the arms and
their recipes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from arms import ARMS
from heldout import EvalSpec
from runs import DEFAULT_CACHE, REPO, recipe_path


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
