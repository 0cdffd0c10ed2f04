"""Code reward and local sandbox: test styles, scoring, and an adversarial suite of hostile programs."""

import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from trl_flowrl.rewards import CodeReward, ExecutionResult, LocalSandbox, SandboxLimits, extract_code, normalize_tests
from trl_flowrl.rewards.code_reward import run_tests, stdout_matches, values_equal
from trl_flowrl.rewards.code_sandbox import _remove_cgroups


TIMEOUT = 2.0


@pytest.fixture(scope="module")
def sandbox():
    return LocalSandbox(SandboxLimits(timeout_s=TIMEOUT, memory_mb=512, max_processes=16), max_concurrency=2)


@pytest.fixture(scope="module")
def reward(sandbox):
    return CodeReward(sandbox, timeout_per_test=TIMEOUT)


def block(code: str) -> list[dict]:
    return [{"role": "assistant", "content": f"Here is my solution.\n```python\n{code.strip()}\n```\n"}]


# A stdin/stdout problem with one visible case (the one a prompt would show) and hidden ones.
SUM_TESTS = {
    "style": "stdio",
    "cases": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "10 -4\n", "output": "6\n"},
        {"input": "123456789 987654321\n", "output": "1111111110\n"},
    ],
}
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"
ADD_TESTS = {
    "style": "functional",
    "fn_name": "add",
    "cases": [{"args": [1, 2], "expected": 3}, {"args": [5, 5], "expected": 10}],
}
ADD_OK = "def add(a, b):\n    return a + b"
ASSERT_TESTS = {
    "style": "assert",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    "prelude": "",
}


# -- pure helpers --------------------------------------------------------------------------------------------------


def test_extract_code_takes_last_complete_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\nand ```python\nprint(3)"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("no code at all") is None
    assert extract_code("```\n\n```") is None


def test_normalize_tests_from_hub_formats():
    taco = normalize_tests('{"inputs": ["1 2\\n"], "outputs": ["3\\n"]}')
    assert taco == {"style": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}]}
    taco_fn = normalize_tests({"inputs": [[1, 2]], "outputs": [[3]], "fn_name": "add"})
    assert taco_fn["style"] == "functional" and taco_fn["cases"][0] == {"args": [1, 2], "expected": [3]}
    lcb_stdin = normalize_tests([{"input": "5\n", "output": "25\n", "testtype": "stdin"}])
    assert lcb_stdin["cases"] == [{"input": "5\n", "output": "25\n"}]
    lcb_fn = normalize_tests(
        [
            {
                "input": "[2,7,11,15]\n9",
                "output": "[0,1]",
                "testtype": "functional",
                "metadata": '{"func_name": "twoSum"}',
            }
        ]
    )
    assert lcb_fn == {
        "style": "functional",
        "fn_name": "twoSum",
        "cases": [{"args": [[2, 7, 11, 15], 9], "expected": [0, 1]}],
        "unwrap": False,
    }
    prime = normalize_tests([{"type": "function_call", "fn_name": "f", "input": [3], "output": [9]}])
    assert prime["cases"] == [{"args": [3], "expected": [9]}] and prime["unwrap"]
    codeforces = normalize_tests([{"input": "1\n", "output": "2\n"}])
    assert codeforces["style"] == "stdio"
    with pytest.raises(ValueError, match="Unrecognised"):
        normalize_tests({"foo": 1})
    with pytest.raises(ValueError, match="func_name"):
        normalize_tests([{"input": "1", "output": "1", "testtype": "functional"}])


def test_output_comparison():
    assert stdout_matches("3\n", "3")
    assert stdout_matches("1 2  3 \n\n", "1 2 3")
    assert stdout_matches("0.3333333\n", "0.333333333")
    assert not stdout_matches("1000001", "1000000")  # integers compare exactly
    assert not stdout_matches("3\n4", "3")
    assert values_equal([1, 2.0000000001], [1, 2.0])
    assert not values_equal(True, 1)
    assert not values_equal([1, 2], [2, 1])
    assert values_equal({"a": [1]}, {"a": [1]})


def test_output_comparison_never_accepts_a_different_integer():
    # Each was accepted before (issue 11): compared as floats to a 1e-6 relative tolerance.
    assert not stdout_matches("123456790.0", "123456789")
    assert not stdout_matches("1e-7", "0")
    assert not stdout_matches("1.2345678901234568e16", "12345678901234567")
    assert not stdout_matches("2.0000001 5", "2 5")
    # The same number written differently is the same answer (LiveCodeBench's grader compares decimals).
    assert stdout_matches("1.0 +5 1e2 -0\n", "1 5 100 0")
    # Where the expected answer is not an integer, an error up to 1e-6 (absolute or relative) is accepted.
    assert stdout_matches("0.1000001", "0.1") and stdout_matches("1e-7", "0.000")
    assert stdout_matches("123456790.0", "123456789.5")
    assert not stdout_matches("0.100002", "0.1")
    assert not stdout_matches("nan", "0.5") and stdout_matches("inf", "inf") and not stdout_matches("inf", "1e400")
    assert not stdout_matches("1e999999999", "0.5") and not stdout_matches("1e-999999999", "1")  # no exception
    # Function-call results: the same rule on JSON numbers.
    assert not values_equal(123456790.0, 123456789)
    assert not values_equal(1e-7, 0)
    assert not values_equal(1.2345678901234568e16, 12345678901234567)
    assert not values_equal([1, 2.0000000001], [1, 2])
    assert values_equal(3.0, 3) and values_equal(0.1 + 0.2, 0.3) and values_equal(1e-7, 0.0)


def test_invalid_reward_configuration():
    with pytest.raises(ValueError, match="scoring"):
        CodeReward(LocalSandbox(), scoring="partial")
    with pytest.raises(ValueError, match="max_tests"):
        CodeReward(LocalSandbox(), max_tests=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        LocalSandbox(max_concurrency=0)
    with pytest.raises(ValueError, match="isolation"):
        LocalSandbox(isolation="docker")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="contention_grace"):
        SandboxLimits(contention_grace=0.5)


class _BrokenExecutor:
    max_concurrency = 1

    def run(self, code, stdin="", files=None, fetch=(), timeout_s=None):
        return ExecutionResult("sandbox_error", detail="executor down")


def test_infrastructure_errors_are_not_wrong_answers():
    reward = CodeReward(_BrokenExecutor(), infra_error_score=None)
    metrics = {}
    scores = reward(
        [block(SUM_OK), block(ADD_OK), "no code"],
        tests=[SUM_TESTS, ADD_TESTS, SUM_TESTS],
        log_metric=metrics.__setitem__,
    )
    assert scores == [None, None, 0.0]
    assert metrics["code_reward/infra_error"] == pytest.approx(2 / 3)
    assert metrics["code_reward/no_code"] == pytest.approx(1 / 3)
    with pytest.raises(KeyError, match="tests"):
        reward([block(SUM_OK)], solution=["3"])


def test_completions_that_are_not_text_score_as_no_code(caplog):
    reward = CodeReward(_BrokenExecutor(), no_code_score=0.0)  # the executor is never reached
    metrics = {}
    with caplog.at_level("WARNING", logger="trl_flowrl.rewards.code_reward"):
        scores = reward([None, [], {"content": "x"}, 7], tests=[SUM_TESTS] * 4, log_metric=metrics.__setitem__)
    assert scores == [0.0, 0.0, 0.0, 0.0]
    assert metrics["code_reward/no_code"] == 1.0 and metrics["code_reward/infra_error"] == 0.0
    assert caplog.text.count("not text") == 4


# -- correct programs, every style ---------------------------------------------------------------------------------


def test_correct_programs_pass_every_style(reward):
    lcb_class = (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n"
    )
    lcb_tests = [
        {"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional", "metadata": {"func_name": "twoSum"}},
        {"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional", "metadata": {"func_name": "twoSum"}},
    ]
    taco = {"inputs": ["2\n3 4\n", "1\n5\n"], "outputs": ["7\n", "5\n"]}
    taco_code = "n = int(input())\nprint(sum(map(int, input().split())))"
    scores = reward(
        [block(SUM_OK), block(ADD_OK), block(lcb_class), block(ADD_OK), block(taco_code)],
        tests=[SUM_TESTS, ADD_TESTS, lcb_tests, ASSERT_TESTS, taco],
    )
    assert scores == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_fraction_and_all_or_nothing_scoring(sandbox):
    half_right = "def add(a, b):\n    return 3"
    fraction = CodeReward(sandbox, scoring="fraction", timeout_per_test=TIMEOUT)
    binary = CodeReward(sandbox, scoring="all_or_nothing", timeout_per_test=TIMEOUT)
    assert fraction([block(half_right)], tests=[ADD_TESTS]) == [0.5]
    assert binary([block(half_right)], tests=[ADD_TESTS]) == [0.0]
    raises = "def add(a, b):\n    if a == 5:\n        raise ValueError\n    return a + b"
    assert fraction([block(raises)], tests=[ADD_TESTS]) == [0.5]
    limited = CodeReward(sandbox, scoring="fraction", max_tests=1, timeout_per_test=TIMEOUT)
    assert limited([block("print(3)")], tests=[SUM_TESTS]) == [1.0]


def test_uncaught_exception_after_correct_output_fails(reward):
    assert reward([block(SUM_OK + "\nraise RuntimeError('after printing')")], tests=[SUM_TESTS]) == [0.0]


# -- the adversarial suite -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def isolated(sandbox):
    if sandbox.isolation == "none":
        pytest.skip("no namespace isolation on this machine: the adversarial suite needs it")
    return sandbox


def _assert_next_program_runs(reward):
    assert reward([block(SUM_OK)], tests=[SUM_TESTS]) == [1.0]


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(10_000)",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))",
    "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "exit_zero_first": "import sys\nsys.exit(0)\n" + SUM_OK,
    "os_exit_zero_first": "import os\nos._exit(0)\n" + SUM_OK,
    "visible_cases_only": "line = input()\nprint({'1 2': '3'}.get(line.strip(), '0'))",
    "detached_child_keeps_running": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10_000)\n"
    + SUM_OK,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_stdio_program_fails_and_harms_nothing(isolated, reward, name):
    start = time.monotonic()
    # A correct program whose detached child would outlive it still passes: the child dies with the sandbox.
    expected = [1.0] if name == "detached_child_keeps_running" else [0.0]
    assert reward([block(HOSTILE[name])], tests=[SUM_TESTS]) == expected
    # Every case gets at most its own timeout; one extra timeout of slack for process start-up.
    assert time.monotonic() - start < len(SUM_TESTS["cases"]) * (TIMEOUT + 5)
    _assert_next_program_runs(reward)


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit(0)"])
def test_early_clean_exit_cannot_pass_function_or_assert_tests(isolated, reward, exit_call):
    code = f"import os, sys\n{exit_call}\n{ADD_OK}"
    assert reward([block(code), block(code)], tests=[ADD_TESTS, ASSERT_TESTS]) == [0.0, 0.0]
    # Exiting from inside the function under test, after some cases ran, fails the remaining ones.
    inside = f"import os, sys\ndef add(a, b):\n    if a == 5:\n        {exit_call}\n    return a + b"
    fraction = CodeReward(isolated, scoring="fraction", timeout_per_test=TIMEOUT)
    assert fraction([block(inside)], tests=[ADD_TESTS]) == [0.5]


def test_forged_completion_records_do_not_pass(isolated, reward):
    forge_assert = (
        "import json\njson.dump({'nonce': '0' * 32}, open('done.json', 'w'))\nimport os\nos._exit(0)\n" + ADD_OK
    )
    forge_results = (
        "import json\nwith open('results.jsonl', 'w') as f:\n"
        "    f.write(json.dumps({'i': 0, 'value': 0}) + '\\n' + json.dumps({'i': 1, 'value': 0}) + '\\n')\n"
        "import os\nos._exit(0)\n"
    )
    assert reward([block(forge_assert), block(forge_results)], tests=[ASSERT_TESTS, ADD_TESTS]) == [0.0, 0.0]


def test_writes_outside_the_work_dir_change_nothing(isolated, reward, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    new_file = tmp_path / "created.txt"
    shared_tmp = f"/tmp/trl-flowrl-escape-{secrets.token_hex(4)}"
    code = f"""
import os, shutil
for action in (
    lambda: open({str(victim)!r}, "w").write("pwned"),
    lambda: os.remove({str(victim)!r}),
    lambda: os.chmod({str(victim)!r}, 0o777),
    lambda: open({str(new_file)!r}, "w").write("pwned"),
    lambda: open({shared_tmp!r}, "w").write("pwned"),
    lambda: os.mkdir({shared_tmp + "-dir"!r}),
    lambda: shutil.rmtree({str(tmp_path)!r}),
):
    try:
        action()
    except Exception:
        pass
open("inside_is_fine.txt", "w").write("ok")
{SUM_OK}
"""
    mode_before = victim.stat().st_mode
    assert reward([block(code)], tests=[SUM_TESTS]) == [1.0]  # it is a correct program; it just failed to escape
    assert victim.read_text() == "original" and victim.stat().st_mode == mode_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert not os.path.exists(shared_tmp) and not os.path.exists(shared_tmp + "-dir")


def test_no_network(isolated, sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    code = f"""
import socket
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        s = socket.create_connection((host, {port} if host == "127.0.0.1" else 80), timeout=1)
        s.sendall(b"pwned")
        print("connected", host)
    except OSError as exc:
        print("blocked", host, type(exc).__name__)
"""
    try:
        result = sandbox.run(code)
        assert result.status == "ok", result
        assert "connected" not in result.stdout and result.stdout.count("blocked") == 2
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_parent_environment_never_reaches_the_program(isolated, sandbox, monkeypatch):
    secret = "trl-flowrl-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("TRL_FLOWRL_TEST_SECRET", secret)
    code = """
import os, glob
print(dict(os.environ))
for path in glob.glob("/proc/*/environ"):
    try:
        print(path, open(path, "rb").read())
    except OSError as exc:
        print(path, type(exc).__name__)
try:
    print(open(f"/proc/{os.getppid()}/environ", "rb").read())
except OSError:
    pass
"""
    result = sandbox.run(code)
    assert result.status == "ok", result
    assert secret not in result.stdout and secret not in result.stderr
    assert "TRL_FLOWRL_TEST_SECRET" not in result.stdout


def test_killing_the_parent_fails_and_everything_survives(isolated, reward):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
for call in (lambda: os.kill(-1, signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL)):
    try:
        call()
    except OSError:
        pass
print("still here")
"""
        assert reward([block(code)], tests=[SUM_TESTS]) == [0.0]
        assert bystander.poll() is None  # a process outside the sandbox, same user, untouched
        os.kill(os.getpid(), 0)  # and so are we
        _assert_next_program_runs(reward)
    finally:
        bystander.kill()
        bystander.wait()


def test_concurrent_programs_are_bounded_and_isolated(isolated, reward):
    # Eight completions at once through a 2-slot sandbox: hostile ones cannot disturb the correct ones.
    completions = [block(SUM_OK), block(HOSTILE["fork_bomb"]), block(SUM_OK), block(HOSTILE["memory_bomb"])] * 2
    assert reward(completions, tests=[SUM_TESTS] * 8) == [1.0, 0.0, 1.0, 0.0] * 2


# -- isolation modes -----------------------------------------------------------------------------------------------


def test_run_results_and_fetched_files(sandbox):
    result = sandbox.run(
        "import sys\nopen('out.txt', 'w').write(sys.stdin.read().upper())\nimport os\nos.symlink('/etc/passwd', 'link')",
        stdin="hello",
        files={"data.txt": "x"},
        fetch=("out.txt", "link", "missing.txt"),
    )
    assert result.status == "ok", result
    assert result.files == {"out.txt": "HELLO"}  # symlinks are never followed out of the work dir
    with pytest.raises(ValueError, match="plain names"):
        sandbox.run("print(1)", files={"../escape.py": "x"})


def _mode_sandbox(mode: str) -> LocalSandbox:
    python = None
    if mode == "namespaces":  # needs an interpreter an unprivileged uid can read
        python = shutil.which("python3", path="/usr/bin:/bin")
        if os.geteuid() != 0 or python is None:
            pytest.skip("namespaces mode needs root and a system python3")
    sandbox = LocalSandbox(SandboxLimits(timeout_s=TIMEOUT, max_processes=16), isolation=mode, python=python)
    try:
        assert sandbox.isolation == mode
    except RuntimeError as exc:
        pytest.skip(f"{mode} isolation unavailable here: {exc}")
    return sandbox


@pytest.mark.parametrize("mode", ["namespaces", "bwrap", "userns"])
def test_core_protections_in_every_available_mode(mode, tmp_path, monkeypatch):
    sandbox = _mode_sandbox(mode)
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    secret = secrets.token_hex(8)
    monkeypatch.setenv("TRL_FLOWRL_TEST_SECRET", secret)
    hostile = f"""
import os, signal, socket, glob
for action in (
    lambda: open({str(victim)!r}, "w").write("pwned"),
    lambda: socket.create_connection(("1.1.1.1", 80), timeout=1),
    lambda: os.kill({os.getpid()}, signal.SIGKILL),
):
    try:
        action()
        print("escaped")
    except OSError:
        pass
for path in glob.glob("/proc/*/environ"):
    try:
        print(open(path, "rb").read())
    except OSError:
        pass
"""
    result = sandbox.run(hostile)
    assert result.status == "ok", result
    assert "escaped" not in result.stdout and secret not in result.stdout
    assert victim.read_text() == "original"
    report = run_tests(HOSTILE["fork_bomb"], SUM_TESTS, sandbox, timeout_per_test=TIMEOUT, stop_at_first_failure=True)
    assert report.passed == 0 and report.timed_out
    assert run_tests(SUM_OK, SUM_TESTS, sandbox, timeout_per_test=TIMEOUT).all_passed
    assert run_tests(ADD_OK, ADD_TESTS, sandbox, timeout_per_test=TIMEOUT).all_passed


def test_namespaces_mode_drops_to_the_slot_uid():
    sandbox = _mode_sandbox("namespaces")
    result = sandbox.run("import os\nprint(os.getuid(), os.getpid())")
    assert result.status == "ok" and result.stdout.split() == [str(sandbox.uid_base), "1"]


def test_none_mode_still_runs_programs_with_limits():
    sandbox = _mode_sandbox("none")
    assert run_tests(ADD_OK, ADD_TESTS, sandbox, timeout_per_test=TIMEOUT).all_passed
    assert sandbox.run("while True: pass", timeout_s=1).status == "timeout"


def test_sandbox_works_in_a_forked_child_and_leaves_the_parent_working(sandbox):
    assert sandbox.run("print(1)").status == "ok"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if sandbox.run("print(2)").stdout.strip() == "2" else 1
        finally:
            _remove_cgroups(sandbox._cgroups + sandbox._acct_cgroups)  # what atexit does, which os._exit skips
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sandbox.run("print(3)").stdout.strip() == "3"  # the child's exit removed none of our cgroups


def test_reward_inside_a_grpo_trainer(tiny_model_path, reward, tmp_path):
    import json

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": "sum?"}], "tests": json.dumps(SUM_TESTS)} for _ in range(4)]
    config = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        report_to="none",
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=tiny_model_path, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows)
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["code_reward/no_code"] == 1.0  # a random tiny model writes no code block
    assert logged["rewards/code_reward/mean"] == 0.0
