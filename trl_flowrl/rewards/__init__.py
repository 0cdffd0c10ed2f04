"""Verifiable rewards: math answers checked by equivalence, programs run against tests in a sandbox.

- `MathAccuracyReward` / `MathVerifier`: math-verify equivalence of `\\boxed{}` or `Answer:` answers, in killable worker
  processes (see `math_reward`).
- `CodeReward`: a completion's last code block against stdin/stdout, function-call or assert tests (see
  `code_reward`), run by a `LocalSandbox` (see `code_sandbox`, including what it does not protect against) or a remote
  `SandboxFusionExecutor` (see `remote_executor`).
"""

from .code_reward import CodeReward, TestReport, extract_code, normalize_tests, run_tests
from .code_sandbox import CodeExecutor, ExecutionResult, LocalSandbox, SandboxLimits
from .math_reward import MathAccuracyReward, MathGrade, MathVerifier, Outcome, extract_answer
from .remote_executor import SandboxFusionExecutor


__all__ = [
    "CodeExecutor",
    "CodeReward",
    "ExecutionResult",
    "LocalSandbox",
    "MathAccuracyReward",
    "MathGrade",
    "MathVerifier",
    "Outcome",
    "SandboxFusionExecutor",
    "SandboxLimits",
    "TestReport",
    "extract_answer",
    "extract_code",
    "normalize_tests",
    "run_tests",
]
