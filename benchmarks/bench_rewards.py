"""Throughput and worst-case latency of the rewards on this machine (not a test: it prints figures).

    python benchmarks/bench_rewards.py [--math-pairs 400] [--programs 60] [--timeout 10]
    python benchmarks/bench_rewards.py --starvation [--seconds 40] [--loops-per-core 6] [--proc-only]

- math verifications per second (MathVerifier, its default two worker processes, typical answers);
- code executions per second (LocalSandbox, trivial programs, 1 and `max_concurrency` slots);
- the latency of each adversarial input: pathological LaTeX (default math-verify timeouts) and each hostile program
  (the default sandbox limits), i.e. how long one bad sample can hold a reward call.

`--starvation` measures instead how often a *correct* program scores 0.0 when the machine is saturated: it times a
single-process and an 8-child-process program alone, starts `--loops-per-core` busy loops per core, grades each program
(two at a time) for `--seconds` with `timeout_per_test = max(1 s, 3x its time alone)`, and prints the rate of each
score (1.0, 0.0, None = infrastructure error) with the sandbox's statuses. The busy loops are killed at the end, on
any exit; the load lasts about 2 x `--seconds` plus the last batches. `--proc-only` measures without the sandbox's
accounting cgroup (as where no cgroup v2 is writable): the starvation figures then come from /proc.
"""

import argparse
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_flowrl.rewards import CodeReward, LocalSandbox, MathVerifier, SandboxLimits, code_sandbox  # noqa: E402


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

# Correct programs of ~0.2-0.4 s alone: one process, and the same kind of work done by 8 child processes in turn.
STARVED_TESTS = {
    "style": "stdio",
    "cases": [{"input": "2000000\n", "output": f"{sum(i * i % 7 for i in range(2_000_000))}\n"}],
}
STARVED_PROGRAMS = {
    "single process": "n = int(input())\nprint(sum(i * i % 7 for i in range(n)))",
    "8 child processes": (
        "import subprocess, sys\n"
        "n = int(input())\n"
        "step = n // 8\n"
        "total = 0\n"
        "for k in range(8):\n"
        "    part = f'print(sum(i * i % 7 for i in range({k * step}, {(k + 1) * step})))'\n"
        "    total += int(subprocess.run([sys.executable, '-S', '-c', part], capture_output=True, text=True).stdout)\n"
        "print(total)"
    ),
}


def starvation(seconds: float, loops_per_core: int) -> None:
    timeouts = {}
    for name, code in STARVED_PROGRAMS.items():
        alone = LocalSandbox(SandboxLimits(timeout_s=30), max_concurrency=1)
        results = [alone.run(code, stdin=STARVED_TESTS["cases"][0]["input"]) for _ in range(3)]
        assert all(r.status == "ok" and r.stdout == STARVED_TESTS["cases"][0]["output"] for r in results), results[0]
        timeouts[name] = max(1.0, 3 * min(r.wall_s for r in results))
        print(f"{name}: {min(r.wall_s for r in results):.2f} s alone -> timeout_per_test {timeouts[name]:.2f} s")
    count = loops_per_core * (os.cpu_count() or 1)
    busy = []
    try:
        for _ in range(count):
            busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True))
        print(f"{count} busy loops started ({loops_per_core} per core)")
        for name, code in STARVED_PROGRAMS.items():
            sandbox = LocalSandbox(SandboxLimits(timeout_s=timeouts[name]), max_concurrency=2)
            reward = CodeReward(sandbox, timeout_per_test=timeouts[name])
            if name == next(iter(STARVED_PROGRAMS)):
                isolation = sandbox.isolation  # detected now, and the accounting cgroups made with it
                accounting = "cgroup v2" if sandbox._acct_cgroups[0] else "/proc"
                print(f"isolation {isolation}, starvation measured from {accounting}")
            completion = f"```python\n{code}\n```"
            scores, statuses, start = [], Counter(), time.monotonic()
            while time.monotonic() - start < seconds:
                reports = reward.grade([completion] * 2, [STARVED_TESTS] * 2)
                scores += [reward.score(r) for r in reports]
                statuses.update(r.details[-1].split(":")[0] for r in reports)
            zeros = sum(score == 0.0 for score in scores)
            print(
                f"{name}: {zeros}/{len(scores)} scored 0.0 ({zeros / len(scores):.0%}), "
                f"{sum(score == 1.0 for score in scores)} scored 1.0, {sum(score is None for score in scores)} None "
                f"(infrastructure error), in {time.monotonic() - start:.0f} s; statuses {dict(statuses)}"
            )
    finally:
        for proc in busy:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math-pairs", type=int, default=400)
    parser.add_argument("--programs", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=10.0, help="sandbox wall-clock timeout per program")
    parser.add_argument("--starvation", action="store_true", help="only the saturated-machine measurement")
    parser.add_argument("--seconds", type=float, default=40.0, help="--starvation: grading time per program")
    parser.add_argument("--loops-per-core", type=int, default=6, help="--starvation: busy loops per core")
    parser.add_argument("--proc-only", action="store_true", help="--starvation: no accounting cgroup, /proc only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.starvation:
        if args.proc_only:
            code_sandbox._make_accounting_cgroups = lambda count: [None] * count
        starvation(args.seconds, args.loops_per_core)
        return

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
