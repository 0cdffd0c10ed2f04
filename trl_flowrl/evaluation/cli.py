"""The evaluation command: `python -m trl_flowrl.evaluation --model PATH --benchmarks a,b ...`.

Examples:
```bash
# The paper's protocol (16 samples, temperature 0.6, top_p 0.95, 8192 tokens) on two checkpoints, side by side
python -m trl_flowrl.evaluation --model grpo=runs/grpo --model flowrl=runs/flowrl \\
    --benchmarks math500,aime24,aime25,amc23,minerva,olympiadbench --output-dir outputs/eval

# The embedded task with the embedded model, on a CPU
python -m trl_flowrl.evaluation --model embedded --benchmarks arithmetic --num-samples 8 --output-dir outputs/eval

# A local dataset (`prompt` and `solution` columns) graded with math-verify, plus the judge rubric
python -m trl_flowrl.evaluation --model Qwen/Qwen2.5-7B --benchmarks data/my_set.jsonl --grader math \\
    --judge-base-url http://localhost:8001/v1 --judge-model Qwen/Qwen2.5-72B-Instruct --output-dir outputs/eval

# One report from runs made separately (e.g. one GPU job per model)
python -m trl_flowrl.evaluation --merge outputs/eval-grpo outputs/eval-flowrl --output-dir outputs/eval
```

Options out of range (`--max-new-tokens 0`, `--num-samples` above 65536) and `--merge` files that are not results
exit with status 2 and a message naming them; a dataset row whose prompt cannot be generated from fails, naming the
row, before any model is loaded. When a file cannot be written after generation, the graded results are kept (a
benchmark's samples go into results.json instead of their own file), the report is printed, and the status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .benchmarks import GRADER_NAMES, available_benchmarks
from .generation import BACKENDS, MAX_NUM_SAMPLES
from .judge import JudgeConfig


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; argparse names the option in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_flowrl.evaluation",
        description="Sample k completions per problem, grade them, and report avg@k, pass@k and diversity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="checkpoint path or hub id (repeat for several models; 'embedded' is the package's tiny arithmetic "
        "model, 'embedded:programs' its programming one)",
    )
    parser.add_argument(
        "--benchmarks",
        default=None,
        help=f"comma-separated names ({', '.join(available_benchmarks())}) or local dataset paths",
    )
    parser.add_argument(
        "--grader",
        default=None,
        help=f"grader of local datasets: {', '.join(GRADER_NAMES)}, or module:function (a TRL reward function); "
        "default: math for local datasets, each built-in benchmark's own otherwise",
    )
    parser.add_argument(
        "--num-samples",
        type=_int_in(1, MAX_NUM_SAMPLES),
        default=16,
        help=f"samples per problem (k), 1 to {MAX_NUM_SAMPLES}",
    )
    parser.add_argument("--temperature", type=_float_in(0.0, float("inf")), default=0.6, help="0: greedy")
    parser.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=0.95)
    parser.add_argument(
        "--max-new-tokens",
        type=_int_in(1),
        default=None,
        help="tokens generated per sample, >= 1; default: 8192 (math, code, local), 80 (arithmetic), 128 (programs)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM when installed")
    parser.add_argument("--batch-size", type=_int_in(1), default=64, help="sequences per generate call (transformers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-threads",
        type=_int_in(1),
        default=None,
        help="torch CPU threads; default for the built-in tasks on a CPU: OMP_NUM_THREADS, else 1 (trl_flowrl.cpu)",
    )
    parser.add_argument("--limit", type=_int_in(1), default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--output-dir", default="outputs/evaluation")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON for from_pretrained")
    parser.add_argument("--vllm-kwargs", type=json.loads, default=None, help="JSON for vllm.LLM")
    judge = parser.add_argument_group("judge rubric (optional; the only network use, off unless a URL is given)")
    judge.add_argument("--judge-base-url", default=None, help="OpenAI-compatible API root, e.g. http://host:8000/v1")
    judge.add_argument("--judge-model", default=None)
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    judge.add_argument("--judge-max-chars", type=int, default=300, help="characters of each sample shown")
    judge.add_argument("--judge-max-concurrency", type=int, default=4)
    judge.add_argument("--judge-timeout", type=float, default=60.0)
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="instead of evaluating: merge results.json files (or their directories) into one report",
    )
    parser.add_argument("--list", action="store_true", help="list the built-in benchmarks and exit")
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _read_results(path: str) -> dict:
    """A results.json (or the directory holding one); ValueError naming the file when it is not one."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {file}: {error}") from None
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("benchmarks"), dict) for entry in models.values()
    ):
        shape = f"a JSON {type(results).__name__}" if not isinstance(results, dict) else f"keys {sorted(results)}"
        raise ValueError(
            f"{file} is not the results.json of an evaluation (an object whose `models` map labels to entries with "
            f"`benchmarks`); it has {shape}."
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.list:
        print("\n".join(available_benchmarks()))
        return 0

    from .report import markdown_report, merge_results, write_report

    if args.merge:
        try:
            runs = [_read_results(path) for path in args.merge]
        except ValueError as error:
            parser.error(f"--merge: {error}")
        results = merge_results(runs, sources=[os.path.abspath(p) for p in args.merge])
        print(markdown_report(results))  # first: a report that cannot be written is still shown
        try:
            paths = write_report(results, args.output_dir, plots=not args.no_plots)
        except (OSError, ImportError) as error:
            print(f"\nCould not write the merged report into {args.output_dir}: {error}", file=sys.stderr)
            return 1
        print(f"\nWrote {', '.join(paths.values())}")
        return 0

    if not args.model or not args.benchmarks:
        parser.error("--model and --benchmarks are required (or --merge, or --list).")
    judge = None
    if args.judge_base_url or args.judge_model:
        if not (args.judge_base_url and args.judge_model):
            parser.error("The judge needs both --judge-base-url and --judge-model.")
        judge = JudgeConfig(
            base_url=args.judge_base_url,
            model=args.judge_model,
            api_key_env=args.judge_api_key_env,
            max_chars=args.judge_max_chars,
            max_concurrency=args.judge_max_concurrency,
            timeout=args.judge_timeout,
        )

    from .evaluator import evaluate

    builtin = {"arithmetic", "programs"}
    benchmarks = [b.strip() for b in str(args.benchmarks).split(",") if b.strip()]
    if args.num_threads is not None or (set(benchmarks) <= builtin and not _cuda_available()):
        from trl_flowrl.cpu import use_cpu_threads

        use_cpu_threads(args.num_threads)

    results = evaluate(
        args.model,
        args.benchmarks,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        output_dir=args.output_dir,
        backend=args.backend,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        grader=args.grader,
        judge=judge,
        plots=not args.no_plots,
        progress=not args.no_progress,
        model_kwargs=args.model_kwargs,
        vllm_kwargs=args.vllm_kwargs,
    )
    print(markdown_report(results))
    if results.get("write_errors"):
        print("\nCould not write, in " + args.output_dir + ":", file=sys.stderr)
        for error in results["write_errors"]:
            print(f"  {error}", file=sys.stderr)
        print("The report above is the graded result.", file=sys.stderr)
        return 1
    print(f"\nWrote {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
