"""SandboxFusion executor against a small fake `run_code` server on loopback."""

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trl_flowrl.rewards import CodeReward
from trl_flowrl.rewards.remote_executor import SandboxFusionExecutor


SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"
SUM_TESTS = {"style": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "4 5\n", "output": "9\n"}]}


def run_result(stdout="", stderr="", code=0, status="Finished"):
    return {
        "status": "Success" if code == 0 and status == "Finished" else "Failed",
        "message": "",
        "compile_result": None,
        "run_result": {
            "status": status,
            "execution_time": 0.01,
            "return_code": code,
            "stdout": stdout,
            "stderr": stderr,
        },
        "files": {},
    }


class FakeSandboxFusion:
    """Answers `POST /run_code` from a script of actions, then by "running" the only program it knows (SUM_OK)."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, **body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    action = fake.script.pop(0) if fake.script else None
                try:
                    time.sleep(fake.delay)
                    if action is None:
                        action = ("json", 200, fake.execute(body))
                    if action[0] == "trickle":  # a valid reply, one byte every `action[1]` seconds
                        data = json.dumps(fake.execute(body)).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(action[1])
                        return
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("json", 200, fake.execute(body))
                    kind, code, payload = action
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def execute(body):
        if body["code"].strip() == SUM_OK:
            a, b = map(int, body["stdin"].split())
            return run_result(stdout=f"{a + b}\n")
        if "while True" in body["code"]:
            return run_result(status="TimeLimitExceeded", code=-9)
        return run_result(stderr="Traceback (most recent call last):\nNameError: x", code=1)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeSandboxFusion()
    yield server
    server.close()


def executor(fake, **kwargs):
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("request_margin_s", 1.0)
    return SandboxFusionExecutor(fake.url, **kwargs)


def test_success_and_protocol(fake):
    ex = executor(fake)
    result = ex.run(SUM_OK, stdin="2 3\n", files={"data.txt": "héllo"}, fetch=("out.txt",), timeout_s=4)
    assert result.status == "ok" and result.stdout == "5\n" and result.exit_code == 0
    request = fake.requests[0]
    assert request["path"] == "/run_code"
    assert request["language"] == "python" and request["run_timeout"] == 4 and request["stdin"] == "2 3\n"
    assert base64.b64decode(request["files"]["data.txt"]).decode() == "héllo"
    assert request["fetch_files"] == ["out.txt"]
    assert ex.stats["requests"] == 1 and ex.stats["retries"] == 0


def test_fetched_files_are_decoded(fake):
    reply = run_result(stdout="")
    reply["files"] = {"out.txt": base64.b64encode(b"result").decode()}
    fake.script = [("json", 200, reply)]
    assert executor(fake).run("print()", fetch=("out.txt",)).files == {"out.txt": "result"}


def test_program_failure_and_timeout_are_not_infra_errors(fake):
    ex = executor(fake)
    failed = ex.run("print(x)")
    assert failed.status == "error" and "NameError" in failed.stderr and not failed.infra_error
    timed_out = ex.run("while True: pass")
    assert timed_out.status == "timeout" and not timed_out.infra_error
    assert ex.stats["retries"] == 0


def test_server_errors_are_retried(fake):
    fake.script = [
        ("json", 500, "oops"),
        ("json", 503, "busy"),
        ("json", 200, {"status": "SandboxError", "message": "pod died"}),
    ]
    ex = executor(fake, max_retries=3)
    result = ex.run(SUM_OK, stdin="1 1\n")
    assert result.status == "ok" and result.stdout == "2\n"
    assert ex.stats["retries"] == 3 and len(fake.requests) == 4


def test_persistent_failure_is_an_infra_error(fake):
    fake.script = [("json", 502, "bad gateway")] * 3
    ex = executor(fake, max_retries=2)
    result = ex.run(SUM_OK, stdin="1 1\n")
    assert result.status == "sandbox_error" and result.infra_error and "502" in result.detail
    assert ex.stats["infra_errors"] == 1 and len(fake.requests) == 3


def test_garbage_and_client_errors(fake):
    fake.script = [("json", 200, "<html>proxy error</html>")]
    assert executor(fake, max_retries=1).run(SUM_OK, stdin="1 1\n").status == "ok"  # retried, then fine
    fake.script = [("json", 400, {"detail": "bad language"})]
    ex = executor(fake, max_retries=3)
    result = ex.run(SUM_OK, stdin="1 1\n")
    assert result.infra_error and "400" in result.detail and ex.stats["retries"] == 0  # not retried


def test_request_timeout_is_retried_then_reported(fake):
    fake.script = [("sleep", 3.0), ("sleep", 3.0)]
    ex = executor(fake, max_retries=1, request_margin_s=0.2)
    start = time.monotonic()
    result = ex.run(SUM_OK, stdin="1 1\n", timeout_s=0.3)
    assert result.infra_error and "timed out" in result.detail.lower()
    assert time.monotonic() - start < 2 * (0.3 + 0.2) + 5


def test_the_budget_bounds_the_whole_request(fake):
    # A server that trickles a valid reply (one byte every 50 ms, never 1 s apart) held a request far past its budget.
    fake.script = [("trickle", 0.05)]
    ex = executor(fake, max_retries=0, request_margin_s=0.5)
    start = time.monotonic()
    result = ex.run(SUM_OK, stdin="1 1\n", timeout_s=0.5)
    assert time.monotonic() - start < 1.0 + 1.5
    assert result.infra_error and "timed out after 1.0 s" in result.detail


WRONG_SHAPES = [
    {"status": "Success", "run_result": "Finished"},
    {"status": "Success", "run_result": ["Finished", 0]},
    {"status": "Success", "run_result": {"status": "Finished", "return_code": 0, "stdout": 5}},
    {"status": "Success", "run_result": {"status": "Finished", "return_code": "0", "stdout": "2\n"}},
    {"status": "Success", "run_result": {"status": ["Finished"], "return_code": 0}},
    {"status": "Success", "run_result": {"status": "Finished", "return_code": 0, "stdout": "2\n"}, "files": ["a"]},
    {"status": "Success", "run_result": {"status": "Finished", "return_code": 0}, "files": {"out.txt": 5}},
    {"status": "Failed", "run_result": None, "compile_result": "error"},
    {"status": 1, "run_result": {"status": "Finished", "return_code": 0, "stdout": "2\n"}},
    [{"status": "Success"}],
]


@pytest.mark.parametrize("reply", WRONG_SHAPES, ids=range(len(WRONG_SHAPES)))
def test_replies_of_the_wrong_shape_are_infra_errors(fake, reply):
    fake.script = [("json", 200, reply)]
    result = executor(fake, max_retries=0).run(SUM_OK, stdin="1 1\n", fetch=("out.txt",))
    assert result.infra_error and "not a run_code reply" in result.detail
    fake.script = [("json", 200, reply)]
    reward = CodeReward(executor(fake, max_retries=0), infra_error_score=None)
    assert reward([f"```python\n{SUM_OK}\n```"], tests=[{"style": "stdio", "cases": SUM_TESTS["cases"][:1]}]) == [None]


def test_unreachable_server_is_an_infra_error():
    ex = SandboxFusionExecutor("http://127.0.0.1:9", max_retries=1, backoff_s=0.01)
    assert ex.run("print(1)").infra_error


def test_concurrency_limit(fake):
    fake.delay = 0.2
    ex = executor(fake, max_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: ex.run(SUM_OK, stdin="1 2\n"), range(8)))
    assert all(r.status == "ok" for r in results)
    assert fake.max_in_flight == 2


def test_code_reward_through_the_remote_executor(fake):
    fake.script = [("json", 500, "x")] * 4  # the first program's first case never gets through
    reward = CodeReward(executor(fake, max_retries=3, max_concurrency=1), infra_error_score=None)
    metrics = {}
    completions = [f"```python\n{code}\n```" for code in (SUM_OK, SUM_OK, "print(x)", "while True: pass")]
    scores = reward(completions, tests=[SUM_TESTS] * 4, log_metric=metrics.__setitem__)
    assert scores == [None, 1.0, 0.0, 0.0]
    assert metrics["code_reward/infra_error"] == 0.25
    assert metrics["code_reward/timeout"] == 0.25


def test_invalid_configuration():
    with pytest.raises(ValueError, match="max_concurrency"):
        SandboxFusionExecutor(max_concurrency=0)
    with pytest.raises(ValueError, match="max_retries"):
        SandboxFusionExecutor(max_retries=-1)
    assert SandboxFusionExecutor("http://h:1/run_code/").url == "http://h:1/run_code"
