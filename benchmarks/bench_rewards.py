"""Throughput and worst-case latency of the rewards on this machine (not a test: it prints figures).

    python benchmarks/bench_rewards.py [--math-pairs 400] [--programs 60] [--timeout 10]

- math verifications per second (MathVerifier, its default two worker processes, typical answers);
- code executions per second (LocalSandbox, trivial programs, 1 and `max_concurrency` slots);
- the latency of each adversarial input: pathological LaTeX (default math-verify timeouts) and each hostile program
  (the default sandbox limits), i.e. how long one bad sample can hold a reward call.
"""

import argparse
import logging
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_flowrl.rewards import CodeReward, LocalSandbox, MathVerifier, SandboxLimits  # noqa: E402


TYPICAL_MATH = [
    (r"... so the answer is \boxed{\frac{2}{4}}", "1/2"),
    ("Step 1...\nAnswer: 34", "34"),
    (r"\boxed{[1, 5)}", "[1,5)"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
    (r"\boxed{\{3, 2, 1\}}", r"\{1,2,3\}"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{17}", "18"),
    ("I could not solve it.", "7"),
]
PATHOLOGICAL_MATH = {
    "deeply nested \\frac (400 levels)": "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    "enormous sum (20k terms)": "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(20_000)) + "}",
    "power tower 9^9^9^9": r"\boxed{9^{9^{9^{9}}}}",
    "2 MB of text before the answer": "a" * 2_000_000 + r"\boxed{3}",
}
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"
SUM_TESTS = {"style": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}]}
ADD_TESTS = {"style": "functional", "fn_name": "add", "cases": [{"args": [1, 2], "expected": 3}]}
HOSTILE = {
    "infinite loop": ("while True:\n    pass", SUM_TESTS),
    "sleep forever": ("import time\ntime.sleep(10_000)", SUM_TESTS),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", SUM_TESTS),
    "memory bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))", SUM_TESTS),
    "output flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", SUM_TESTS),
    "write outside work dir": ("open('/tmp/escape.txt', 'w').write('x')", SUM_TESTS),
    "network connection": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=5)", SUM_TESTS),
    "read parent env": ("import os\nprint(open('/proc/1/environ').read())", SUM_TESTS),
    "sys.exit(0) before tests": ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", ADD_TESTS),
    "os._exit(0) before tests": ("import os\nos._exit(0)\ndef add(a, b):\n    return a + b", ADD_TESTS),
    "visible cases only": (
        "print(3)",
        {"style": "stdio", "cases": SUM_TESTS["cases"] + [{"input": "2 2\n", "output": "4\n"}]},
    ),
    "kill the parent": ("import os, signal\nos.kill(os.getppid(), 9)\nos.kill(-1, signal.SIGKILL)", SUM_TESTS),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math-pairs", type=int, default=400)
    parser.add_argument("--programs", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=10.0, help="sandbox wall-clock timeout per program")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")

    verifier = MathVerifier()
    verifier.grade([c for c, _ in TYPICAL_MATH], [g for _, g in TYPICAL_MATH])  # start the workers
    pairs = [TYPICAL_MATH[i % len(TYPICAL_MATH)] for i in range(args.math_pairs)]
    start = time.monotonic()
    verifier.grade([c for c, _ in pairs], [g for _, g in pairs])
    elapsed = time.monotonic() - start
    print(f"\nmath: {len(pairs) / elapsed:.0f} verifications/s ({verifier.num_workers} workers, {len(pairs)} pairs)")
    print(
        f"math pathological inputs (parse/verify timeouts {verifier.parse_timeout}/{verifier.verify_timeout} s, "
        f"hard kill at {verifier.hard_timeout:g} s):"
    )
    for name, text in PATHOLOGICAL_MATH.items():
        start = time.monotonic()
        grade = verifier.grade_one(text, "3")
        print(f"  {name:38s} {time.monotonic() - start:6.2f} s  -> {grade.outcome.value}")

    limits = SandboxLimits(timeout_s=args.timeout)
    sandbox = LocalSandbox(limits, max_concurrency=2)
    print(f"\ncode sandbox isolation: {sandbox.isolation}")
    for workers in (1, sandbox.max_concurrency):
        start = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda _: sandbox.run("print(1)"), range(args.programs)))
        elapsed = time.monotonic() - start
        assert all(r.status == "ok" for r in results), results[0]
        print(f"code: {args.programs / elapsed:.1f} executions/s with {workers} concurrent (trivial programs)")
    reward = CodeReward(sandbox, timeout_per_test=args.timeout)
    print(f"code adversarial programs (timeout {args.timeout:g} s, memory {limits.memory_mb} MB):")
    for name, (code, tests) in HOSTILE.items():
        start = time.monotonic()
        score = reward([f"```python\n{code}\n```"], tests=[tests])[0]
        print(f"  {name:38s} {time.monotonic() - start:6.2f} s  -> score {score}")
    start = time.monotonic()
    score = reward([f"```python\n{SUM_OK}\n```"], tests=[SUM_TESTS])[0]
    print(f"  {'next correct program':38s} {time.monotonic() - start:6.2f} s  -> score {score}")


if __name__ == "__main__":
    main()
