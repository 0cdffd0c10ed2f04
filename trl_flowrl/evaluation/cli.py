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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .benchmarks import GRADER_NAMES, available_benchmarks
from .generation import BACKENDS
from .judge import JudgeConfig


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
    parser.add_argument("--num-samples", type=int, default=16, help="samples per problem (k)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: 8192 (math, code, local), 80 (arithmetic), 128 (programs)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM when installed")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (transformers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads; default for the built-in tasks on a CPU: OMP_NUM_THREADS, else 1 (trl_flowrl.cpu)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
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
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    with open(file) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.list:
        print("\n".join(available_benchmarks()))
        return 0

    from .report import markdown_report, merge_results, write_report

    if args.merge:
        runs = [_read_results(path) for path in args.merge]
        results = merge_results(runs, sources=[os.path.abspath(p) for p in args.merge])
        paths = write_report(results, args.output_dir, plots=not args.no_plots)
        print(markdown_report(results))
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
    print(f"\nWrote {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
