"""The judge rubric client against a fake OpenAI-compatible server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from datasets import Dataset

from trl_flowrl.evaluation import Benchmark, JudgeClient, JudgeConfig, score_samples
from trl_flowrl.evaluation.judge import build_judge_messages, parse_judge_score


class FakeChatServer:
    """Answers POST /v1/chat/completions with scripted (status, content) replies, recording each request."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, content = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                if callable(content):
                    content = content(body)
                payload = (
                    {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                    if status == 200
                    else {"error": {"message": content}}
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def config(base_url, **overrides):
    return JudgeConfig(**{"base_url": base_url, "model": "judge-model", "backoff": 0.01, **overrides})


def test_scores_a_problem_and_sends_the_rubric_request(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-key")
    samples = ["x" * 500, "use casework", "use algebra"]
    with FakeChatServer([(200, "Two approaches: casework and algebra.\nScore: 3")]) as server:
        result = JudgeClient(config(server.base_url, api_key_env="TEST_JUDGE_KEY")).judge("What is 1+1?", samples)
    assert result.score == 3 and result.error is None and "casework" in result.reply
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer secret-key"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0.0
    system, user = request["body"]["messages"]
    assert system["role"] == "system" and "4 or more" not in system["content"]
    assert "5 - four or more clearly distinct approaches" in system["content"]
    assert "What is 1+1?" in user["content"]
    assert "x" * 300 in user["content"] and "x" * 301 not in user["content"]  # first 300 characters only
    assert "### Attempt 3\nuse algebra" in user["content"]


def test_no_authorization_header_without_a_key(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with FakeChatServer([(200, "Score: 1")]) as server:
        assert JudgeClient(config(server.base_url, api_key_env="TEST_JUDGE_KEY")).judge("p", ["a", "a"]).score == 1
    assert "Authorization" not in server.requests[0]["headers"]


def test_retries_server_errors_then_succeeds():
    with FakeChatServer([(503, "overloaded"), (500, "oops"), (200, "Score: 5")]) as server:
        result = JudgeClient(config(server.base_url, max_retries=3)).judge("p", ["a", "b"])
    assert result.score == 5
    assert len(server.requests) == 3


def test_gives_up_after_the_retries():
    with FakeChatServer([(429, "slow down")]) as server:
        result = JudgeClient(config(server.base_url, max_retries=2)).judge("p", ["a"])
    assert result.score is None and "HTTP 429" in result.error
    assert len(server.requests) == 3


def test_does_not_retry_a_client_error():
    with FakeChatServer([(401, "bad key")]) as server:
        result = JudgeClient(config(server.base_url, max_retries=3)).judge("p", ["a"])
    assert result.score is None and "HTTP 401" in result.error and "bad key" in result.error
    assert len(server.requests) == 1


def test_a_reply_without_a_score_is_reported():
    with FakeChatServer([(200, "They all look alike to me.")]) as server:
        result = JudgeClient(config(server.base_url)).judge("p", ["a"])
    assert result.score is None and result.error == "no score in the reply"


def test_unreachable_endpoint_is_an_error_not_a_crash():
    with FakeChatServer([(200, "Score: 1")]) as server:
        url = server.base_url
    result = JudgeClient(config(url, max_retries=0, timeout=2)).judge("p", ["a"])
    assert result.score is None and "cannot reach" in result.error


def test_judge_many_keeps_the_order_under_concurrency():
    def reply(body):
        problem = body["messages"][1]["content"].split("\n")[1]
        return f"Score: {problem[-1]}"

    problems = [f"problem {i % 5 + 1}" for i in range(12)]
    with FakeChatServer([(200, reply)]) as server:
        results = JudgeClient(config(server.base_url, max_concurrency=4)).judge_many(problems, [["a", "b"]] * 12)
    assert [r.score for r in results] == [i % 5 + 1 for i in range(12)]


def test_parse_judge_score():
    assert parse_judge_score("Reasoning...\nScore: 4") == 4
    assert parse_judge_score("score = 2") == 2
    assert parse_judge_score("**Score:** 5") == 5
    assert parse_judge_score("Score: 2\nOn reflection, Score: 3") == 3
    assert parse_judge_score("3") == 3
    assert parse_judge_score("between 2 and 3") is None
    assert parse_judge_score("Score: 7") is None
    assert parse_judge_score("") is None


def test_build_judge_messages_cuts_samples():
    messages = build_judge_messages("Find x.", ["abcdef", "ghi"], max_chars=4)
    assert "abcd" in messages[1]["content"] and "abcde" not in messages[1]["content"]
    assert "2 attempts" in messages[0]["content"] and "at most 4 characters" in messages[0]["content"]
    with pytest.raises(ValueError):
        build_judge_messages("p", [])


@pytest.mark.parametrize(
    "overrides",
    [{"base_url": "localhost:8000"}, {"model": ""}, {"max_chars": 0}, {"timeout": 0}, {"max_retries": -1}],
)
def test_invalid_config(overrides):
    with pytest.raises(ValueError):
        JudgeConfig(**{"base_url": "http://127.0.0.1:1/v1", "model": "m", **overrides})


def test_score_samples_reports_the_judge_mean():
    benchmark = Benchmark(
        "judged",
        Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}"}], "solution": "1"} for i in range(3)]),
        lambda text, row: text == row["solution"],
    )

    def reply(body):
        question = body["messages"][1]["content"].split("\n")[1]
        return {"q0": "Score: 1", "q1": "Score: 4", "q2": "no idea"}[question]

    with FakeChatServer([(200, reply)]) as server:
        result = score_samples(benchmark, [["1", "2"], ["1", "1"], ["3", "3"]], judge=config(server.base_url))
    assert result["diversity"]["judge_score"] == pytest.approx(2.5)
    assert result["diversity"]["judge_failures"] == 1
    assert [p["judge_score"] for p in result["problems"]] == [1, 4, None]
    assert result["problems"][2]["judge_error"] == "no score in the reply"
