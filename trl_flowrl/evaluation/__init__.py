"""Evaluation: k samples per problem, avg@k, unbiased pass@k curves, and diversity, for one model or several.

```python
from trl_flowrl.evaluation import evaluate

results = evaluate({"grpo": "runs/grpo", "flowrl": "runs/flowrl"}, "math500,aime24", num_samples=16,
                   output_dir="outputs/eval")
results["models"]["flowrl"]["benchmarks"]["aime24"]["avg_at_k"]
```

The same from the command line: `python -m trl_flowrl.evaluation --model grpo=runs/grpo --model flowrl=runs/flowrl
--benchmarks math500,aime24 --output-dir outputs/eval`. A benchmark is a dataset of prompts, a grader and an optional
reasoning-path identifier (`Benchmark`); `score_samples` grades completions generated elsewhere; the metrics are
pure functions in `trl_flowrl.evaluation.metrics`. Nothing here uses the network unless a judge endpoint is configured.
"""

from .benchmarks import (
    Benchmark,
    Grade,
    arithmetic_benchmark,
    available_benchmarks,
    boxed_grader,
    code_grader,
    load_benchmark,
    load_grader,
    math_grader,
    programs_benchmark,
    reward_function_grader,
)
from .evaluator import evaluate, named_models, score_samples
from .generation import Sample, load_generator
from .judge import JudgeClient, JudgeConfig, JudgeResult
from .metrics import avg_at_k, distinct_n, pass_at_k, pass_at_k_curve, self_bleu
from .report import markdown_report, merge_results, write_report


__all__ = [
    "Benchmark",
    "Grade",
    "JudgeClient",
    "JudgeConfig",
    "JudgeResult",
    "Sample",
    "arithmetic_benchmark",
    "available_benchmarks",
    "avg_at_k",
    "boxed_grader",
    "code_grader",
    "distinct_n",
    "evaluate",
    "load_benchmark",
    "load_generator",
    "load_grader",
    "markdown_report",
    "math_grader",
    "merge_results",
    "named_models",
    "pass_at_k",
    "pass_at_k_curve",
    "programs_benchmark",
    "reward_function_grader",
    "score_samples",
    "self_bleu",
    "write_report",
]
