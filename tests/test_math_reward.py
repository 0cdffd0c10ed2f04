"""Math reward: equivalence by math-verify in killable workers, outcomes kept apart, both answer formats."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from trl_flowrl.rewards import MathAccuracyReward, MathVerifier, Outcome, extract_answer
from trl_flowrl.rewards._procpool import WorkerPool, WorkerTimeout
from trl_flowrl.rewards.math_reward import completion_text, gold_to_latex


# Short math-verify timeouts keep the pathological cases fast; the hard deadline sits well above them.
FAST = dict(parse_timeout=1, verify_timeout=1, hard_timeout=6)


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier(**FAST)


# -- extraction (pure) ---------------------------------------------------------------------------------------------


def test_extract_boxed_takes_last_balanced_box():
    assert extract_answer(r"first \boxed{1} then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    # An unclosed box (truncated completion) is ignored in favour of the last complete one.
    assert extract_answer(r"\boxed{3} and then \boxed{\frac{1}{") == "3"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed{}") is None


def test_extract_answer_line_dapo_format():
    text = "Step 1 ...\nStep 2 ...\nAnswer: $\\frac{3}{4}$."
    assert extract_answer(text, "answer_line") == r"\frac{3}{4}"
    assert extract_answer("answer:  12 \n", "answer_line") == "12"
    assert extract_answer("**Answer:** 5", "answer_line") == "5"
    assert extract_answer(r"Answer: \boxed{9}", "answer_line") == "9"
    assert extract_answer("no final line", "answer_line") is None
    # In "boxed" mode an Answer line is not an answer, and the other way round.
    assert extract_answer("Answer: 3", "boxed") is None
    assert extract_answer(r"\boxed{3}", "answer_line") is None


def test_extract_auto_takes_whichever_comes_last():
    assert extract_answer("I guess \\boxed{3}.\nAnswer: 4") == "4"
    assert extract_answer("Answer: 4 is wrong, so \\boxed{3}") == "3"
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("x", "latex")


def test_gold_to_latex_and_completion_text():
    assert gold_to_latex("34") == r"\boxed{34}"
    assert gold_to_latex("$x^2$") == r"\boxed{x^2}"
    assert gold_to_latex(r"\boxed{5}") == r"\boxed{5}"
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "xyz"}]) == "xyz"
    with pytest.raises(TypeError):
        completion_text(3)


# -- equivalence ---------------------------------------------------------------------------------------------------


EQUIVALENT = [
    (r"so \boxed{\frac{2}{4}}", "1/2"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac12}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
    (r"\boxed{[1, 5)}", "[1,5)"),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]"),
    (r"\boxed{\{3, 2, 1\}}", r"\{1,2,3\}"),
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{12 \text{ meters}}", "12"),
    ("Reasoning...\nAnswer: 34", "34"),
    ("Reasoning...\nAnswer: $\\frac{7}{2}$", "3.5"),
    ([{"role": "assistant", "content": r"It is \boxed{x^2+2x+1}"}], "(x+1)^2"),
]

NOT_EQUIVALENT = [
    (r"\boxed{\frac{1}{3}}", "1/2"),
    (r"\boxed{[1, 5]}", "[1,5)"),
    (r"\boxed{\{1, 2\}}", r"\{1,2,3\}"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{12}"),
    ("Answer: 35", "34"),
]


def test_equivalent_forms_accepted(verifier):
    completions = [completion_text(c) for c, _ in EQUIVALENT]
    grades = verifier.grade(completions, [g for _, g in EQUIVALENT])
    assert [g.outcome for g in grades] == [Outcome.CORRECT] * len(EQUIVALENT), grades


def test_wrong_answers_rejected(verifier):
    grades = verifier.grade([c for c, _ in NOT_EQUIVALENT], [g for _, g in NOT_EQUIVALENT])
    assert [g.outcome for g in grades] == [Outcome.WRONG] * len(NOT_EQUIVALENT), grades


def test_missing_answer_and_unparseable_gold_are_reported(verifier):
    no_answer, bad_gold, empty_gold = verifier.grade(["I do not know.", r"\boxed{3}", r"\boxed{3}"], ["3", "???", ""])
    assert no_answer.outcome is Outcome.NO_ANSWER
    assert bad_gold.outcome is Outcome.GOLD_UNPARSEABLE and "???" in bad_gold.detail
    assert empty_gold.outcome is Outcome.GOLD_UNPARSEABLE


def test_answer_format_restricts_extraction():
    boxed_only = MathVerifier(answer_format="boxed", **FAST)
    assert boxed_only.grade_one("Answer: 3", "3").outcome is Outcome.NO_ANSWER
    line_only = MathVerifier(answer_format="answer_line", **FAST)
    assert line_only.grade_one(r"\boxed{3}", "3").outcome is Outcome.NO_ANSWER
    assert line_only.grade_one("work\nAnswer: 3", "3").outcome is Outcome.CORRECT


def test_invalid_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="answer_format"):
        MathVerifier(answer_format="latex")
    with pytest.raises(ValueError, match="whole number of seconds"):
        MathVerifier(parse_timeout=0.5)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
    with pytest.raises(ValueError, match="completions"):
        MathVerifier().grade(["a", "b"], ["1"])


# -- pathological input ----------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "deeply_nested": "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    "enormous_sum": "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(20_000)) + "}",
    "power_tower": r"\boxed{9^{9^{9^{9}}}}",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_latex_times_out_within_bound(verifier, name):
    gold = "3"
    start = time.monotonic()
    grade = verifier.grade_one(PATHOLOGICAL[name], gold)
    elapsed = time.monotonic() - start
    assert grade.outcome is Outcome.TIMEOUT, grade
    assert elapsed < verifier.hard_timeout + 5
    # The pool is still healthy: the next request is graded normally.
    assert verifier.grade_one(r"\boxed{3}", "3").outcome is Outcome.CORRECT


def test_hard_deadline_kills_the_worker_and_replaces_it():
    # math-verify's own timeout (5 s) is longer than the hard deadline: only the kill can stop this one.
    verifier = MathVerifier(parse_timeout=5, verify_timeout=5, hard_timeout=0.5, num_workers=1)
    verifier.grade_one(r"\boxed{1}", "1")  # start the worker first: start-up is not charged to a request
    restarts = verifier.pool.restarts
    start = time.monotonic()
    grade = verifier.grade_one(PATHOLOGICAL["enormous_sum"], "3")
    assert grade.outcome is Outcome.TIMEOUT and grade.detail.startswith("worker killed"), grade
    assert time.monotonic() - start < 0.5 + 5
    assert verifier.pool.restarts == restarts + 1
    assert verifier.grade_one(r"\boxed{3}", "3").outcome is Outcome.CORRECT


def test_pool_kills_a_hung_worker(tmp_path):
    (tmp_path / "hang_worker.py").write_text(
        textwrap.dedent(
            """
            import json, sys, time
            print("{}", flush=True)
            for line in sys.stdin:
                request = json.loads(line)
                time.sleep(request["sleep"])
                print(json.dumps({"slept": request["sleep"]}), flush=True)
            """
        )
    )
    pool = WorkerPool("hang_worker", num_workers=1, env={"PYTHONPATH": str(tmp_path)})
    try:
        assert pool.request({"sleep": 0}, deadline_s=30) == {"slept": 0}
        start = time.monotonic()
        with pytest.raises(WorkerTimeout):
            pool.request({"sleep": 3600}, deadline_s=0.5)
        assert time.monotonic() - start < 0.5 + 5
        assert pool.request({"sleep": 0}, deadline_s=30) == {"slept": 0}
        assert pool.restarts == 1
    finally:
        pool.close()


# -- threads, processes, the TRL reward ------------------------------------------------------------------------------


def test_worker_thread_gives_the_same_results_as_main_thread(verifier):
    completions = [c for c, _ in EQUIVALENT + NOT_EQUIVALENT]
    completions = [completion_text(c) for c in completions] + [PATHOLOGICAL["power_tower"]]
    golds = [g for _, g in EQUIVALENT + NOT_EQUIVALENT] + ["3"]
    main_thread = [g.outcome for g in verifier.grade(completions, golds)]
    results = {}

    def run(key):
        results[key] = [g.outcome for g in verifier.grade(completions, golds)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == main_thread
    assert main_thread[-1] is Outcome.TIMEOUT


def test_usable_from_a_forked_child_and_a_fresh_process(verifier):
    verifier.grade_one(r"\boxed{1}", "1")  # the parent's workers exist before the fork
    pid = os.fork()
    if pid == 0:  # child: must start its own workers, not talk to the parent's
        code = 0
        try:
            code = 0 if verifier.grade_one(r"\boxed{2}", "2").outcome is Outcome.CORRECT else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert verifier.grade_one(r"\boxed{3}", "3").outcome is Outcome.CORRECT  # the parent's pool still works

    script = (
        "from trl_flowrl.rewards import MathVerifier; print(MathVerifier().grade_one('Answer: 7', '7').outcome.value)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.stdout.strip() == "correct", out.stderr


def test_reward_scores_and_metrics():
    reward = MathAccuracyReward(timeout_score=None, error_score=-1.0, **FAST)
    metrics, extra = {}, {}
    completions = [
        [{"role": "assistant", "content": r"\boxed{4}"}],
        [{"role": "assistant", "content": r"\boxed{5}"}],
        [{"role": "assistant", "content": "no answer here"}],
        [{"role": "assistant", "content": PATHOLOGICAL["power_tower"]}],
        [{"role": "assistant", "content": r"\boxed{1}"}],
    ]
    scores = reward(
        completions,
        solution=["4", "4", "4", "3", "???"],
        log_metric=metrics.__setitem__,
        log_extra=extra.__setitem__,
        trainer_state=None,
        prompt_id=[0, 1, 2, 3, 4],
    )
    assert scores == [1.0, 0.0, 0.0, None, None]
    assert metrics["math_reward/correct"] == pytest.approx(0.2)
    assert metrics["math_reward/wrong"] == pytest.approx(0.2)
    assert metrics["math_reward/no_answer"] == pytest.approx(0.2)
    assert metrics["math_reward/timeout"] == pytest.approx(0.2)
    assert metrics["math_reward/gold_unparseable"] == pytest.approx(0.2)
    assert metrics["math_reward/error"] == metrics["math_reward/infra_error"] == 0.0
    assert extra["math_outcome"] == ["correct", "wrong", "no_answer", "timeout", "gold_unparseable"]
    assert extra["math_answer"][:2] == ["4", "5"]
    assert reward.__name__ == "math_accuracy"  # the name TRL logs the reward under


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_worker_killed_mid_request_is_graded_again_on_a_fresh_worker():
    # What the OOM killer does when the trainer takes the memory: SIGKILL a worker that is busy grading. The answer
    # is graded again on a fresh worker, and that grade counts (here math-verify's own 2 s timeout), not a skip.
    reward = MathAccuracyReward(num_workers=1, parse_timeout=2, verify_timeout=2, hard_timeout=120, timeout_score=-0.5)
    pool = reward.verifier.pool
    assert reward([r"\boxed{1}"], solution=["1"]) == [1.0]  # the worker is up
    worker, restarts = pool._slots[0].proc, pool.restarts
    idle_cpu = _cpu_s(worker.pid)
    huge = "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(200_000)) + "}"  # minutes of parsing, no timeout
    metrics, extra, result = {}, {}, {}
    grading = threading.Thread(
        target=lambda: result.setdefault(
            "scores", reward([huge], solution=["3"], log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
        ),
        daemon=True,
    )
    grading.start()
    deadline = time.monotonic() + 60
    while _cpu_s(worker.pid) < idle_cpu + 0.2:  # it has read the request and is working on it
        assert time.monotonic() < deadline and grading.is_alive()
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    grading.join(timeout=60)
    assert not grading.is_alive(), "the reward did not return after its worker was killed"
    assert extra["math_outcome"] == ["timeout"] and result["scores"] == [-0.5]
    assert metrics["math_reward/infra_error"] == 0.0 and metrics["math_reward/error"] == 0.0
    assert pool.restarts == restarts + 1 and pool._slots[0].proc.pid != worker.pid
    assert reward([r"\boxed{2}"], solution=["2"]) == [1.0]  # the fresh worker grades the next request


CRASH_WORKER = """
import os, signal, sys
from trl_flowrl.rewards._procpool import serve
from trl_flowrl.rewards._math_worker import _answer

def handle(request):
    # Stands for an answer whose grading blows up the memory (the OOM killer's SIGKILL): CRASH_ALWAYS kills every
    # worker it is sent to, CRASH_ONCE the first, CRASH_NO_RESTART also keeps the next worker from starting.
    text, flags = request["completion"], os.environ["CRASH_FLAGS"]
    once = os.path.join(flags, "crashed-once")
    if "CRASH_NO_RESTART" in text:
        open(os.path.join(flags, "no-start"), "w").close()
    if "CRASH_ALWAYS" in text or "CRASH_NO_RESTART" in text or ("CRASH_ONCE" in text and not os.path.exists(once)):
        open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return _answer(request)

if os.path.exists(os.path.join(os.environ["CRASH_FLAGS"], "no-start")):
    sys.exit(1)
serve(handle)
"""


@pytest.fixture
def crashing_reward(tmp_path, monkeypatch):
    """A MathAccuracyReward (error_score -1) whose single worker SIGKILLs itself on the answers of `CRASH_WORKER`."""
    from trl_flowrl.rewards import math_reward

    (tmp_path / "crash_worker.py").write_text(CRASH_WORKER)
    env = {"PYTHONPATH": str(tmp_path), "CRASH_FLAGS": str(tmp_path)}
    pool = WorkerPool("crash_worker", num_workers=1, env=env)
    monkeypatch.setitem(math_reward._pools, 1, pool)  # what MathVerifier(num_workers=1) uses
    yield MathAccuracyReward(num_workers=1, error_score=-1.0, **FAST), pool
    pool.close()


def test_an_answer_that_kills_the_worker_twice_is_an_error(crashing_reward):
    # Deterministic: the same answer kills a fresh worker too, so it is the answer's property (`error`, error_score),
    # not skipped forever as an infrastructure error. The other answers of the batch are graded as usual.
    reward, pool = crashing_reward
    metrics, extra = {}, {}
    completions = [r"\boxed{4}", r"CRASH_ALWAYS \boxed{4}", r"\boxed{5}"]
    scores = reward(completions, solution=["4"] * 3, log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    assert extra["math_outcome"] == ["correct", "error", "wrong"] and scores == [1.0, -1.0, 0.0]
    assert metrics["math_reward/error"] == pytest.approx(1 / 3) and metrics["math_reward/infra_error"] == 0.0
    assert pool.restarts == 2  # the first worker and the fresh one it was retried on
    grade = reward.verifier.grade_one(r"CRASH_ALWAYS \boxed{4}", "4")
    assert grade.outcome is Outcome.ERROR and "killed two workers" in grade.detail


def test_a_worker_death_followed_by_a_grade_gives_that_grade(crashing_reward):
    reward, pool = crashing_reward
    extra = {}
    assert reward([r"CRASH_ONCE \boxed{4}"], solution=["4"], log_extra=extra.__setitem__) == [1.0]
    assert extra["math_outcome"] == ["correct"] and pool.restarts == 1


def test_a_retry_that_cannot_run_is_an_infrastructure_error_skipped_by_default(crashing_reward, tmp_path):
    # The worker died on the answer and no fresh one starts: the answer was never judged, so its default score is
    # None (TRL skips it), as for CodeReward's infrastructure errors.
    reward, pool = crashing_reward
    metrics, extra = {}, {}
    scores = reward(
        [r"CRASH_NO_RESTART \boxed{4}"], solution=["4"], log_metric=metrics.__setitem__, log_extra=extra.__setitem__
    )
    assert scores == [None] and extra["math_outcome"] == ["infra_error"]
    assert metrics["math_reward/infra_error"] == 1.0 and metrics["math_reward/error"] == 0.0
    (tmp_path / "no-start").unlink()
    assert reward([r"\boxed{2}"], solution=["2"]) == [1.0]  # workers start again: the next answer is graded
    assert MathAccuracyReward(infra_error_score=0.0, num_workers=1).scores[Outcome.INFRA_ERROR] == 0.0


def test_reward_inside_a_grpo_trainer(tiny_model_path, arithmetic_dataset, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

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
    reward = MathAccuracyReward(**FAST)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[reward], args=config, train_dataset=arithmetic_dataset)
    trainer.train()
    logged = trainer.state.log_history[0]
    # A random tiny model writes no final answer: every completion is graded, none crashes the step.
    assert logged["math_reward/no_answer"] + logged["math_reward/wrong"] + logged["math_reward/correct"] == 1.0
    assert logged["rewards/math_accuracy/mean"] == logged["math_reward/correct"]


# -- gold answers that are words or missing --------------------------------------------------------------------------


def test_word_and_missing_golds_are_unparseable(verifier):
    # math-verify reads a bare word as a product of one-letter symbols, so any anagram matched it: `None` (a missing
    # solution turned into a string) equalled `neon`.
    pairs = [
        (r"\boxed{neon}", None),
        (r"\boxed{neon}", "None"),
        (r"\boxed{None}", "neon"),
        (r"\boxed{sey}", "yes"),
        (r"\boxed{3}", ""),
        (r"\boxed{3}", "  "),
        (r"\boxed{solution no}", "no solution"),
        (r"\boxed{nan}", float("nan")),
        (r"\boxed{Tuesday}", "Tuesday"),
        (r"\boxed{xy}", "xy"),  # a run of letters cannot be told from a word: write `x y` or `x \cdot y`
    ]
    grades = verifier.grade([c for c, _ in pairs], [g for _, g in pairs])
    assert [g.outcome for g in grades] == [Outcome.GOLD_UNPARSEABLE] * len(pairs), grades
    assert "None" in grades[0].detail or "missing" in grades[0].detail
    reward = MathAccuracyReward(**FAST)  # skipped by default
    assert reward([r"\boxed{neon}", r"\boxed{3}"], solution=[None, "3"]) == [None, 1.0]


SYMBOLIC_GOLDS = [
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{1 + x^2}", "x^2+1"),
    (r"\boxed{(0, 1]}", "(0,1]"),
    (r"\boxed{\pi}", r"\pi"),
    (r"\boxed{b+a}", "a+b"),
    (r"\boxed{y x}", "x y"),
    (r"\boxed{2}", "x=2"),
    (r"\boxed{\sin x}", r"\sin x"),
    (r"\boxed{\log_2 3}", r"\log_{2} 3"),
    (r"\boxed{5}", r"5\text{ cm}"),  # units are dropped by math-verify: the words leave no symbol behind
    (r"\boxed{90}", "90 degrees"),
    (r"\boxed{3, 4}", "3 and 4"),
    (r"\boxed{C}", r"\text{(C)}"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),  # a word in \text{} is one symbol, compared whole
    (r"\boxed{v_{max}}", "v_{max}"),
    (r"\boxed{12}", 12),
]


def test_symbolic_golds_stay_gradable(verifier):
    grades = verifier.grade([c for c, _ in SYMBOLIC_GOLDS], [g for _, g in SYMBOLIC_GOLDS])
    assert [g.outcome for g in grades] == [Outcome.CORRECT] * len(SYMBOLIC_GOLDS), grades
    # A word in \text{} is compared whole: the word itself matches, an anagram does not.
    completions = [r"\boxed{x^2}", r"\boxed{neon}", r"\boxed{enon}", r"\boxed{\text{enon}}", r"\boxed{Evelyn}"]
    golds = ["x^2+1", r"\text{neon}", r"\text{neon}", r"\text{neon}", "Evelyn"]
    outcomes = [g.outcome for g in verifier.grade(completions, golds)]
    assert outcomes == [Outcome.WRONG, Outcome.CORRECT, Outcome.WRONG, Outcome.WRONG, Outcome.GOLD_UNPARSEABLE]


# -- malformed completions -------------------------------------------------------------------------------------------


MALFORMED = [None, [], {"role": "assistant", "content": r"\boxed{3}"}, 3, ["\\boxed{3}"], [{"role": "assistant"}]]


def test_malformed_completions_score_as_no_answer(verifier, caplog):
    reward = MathAccuracyReward(**FAST)
    metrics, extra = {}, {}
    completions = [*MALFORMED, [{"role": "assistant", "content": r"\boxed{3}"}]]
    with caplog.at_level("WARNING", logger="trl_flowrl.rewards.math_reward"):
        scores = reward(
            completions, solution=["3"] * len(completions), log_metric=metrics.__setitem__, log_extra=extra.__setitem__
        )
    assert scores == [0.0] * len(MALFORMED) + [1.0]
    assert extra["math_outcome"] == ["no_answer"] * len(MALFORMED) + ["correct"]
    assert metrics["math_reward/no_answer"] == pytest.approx(len(MALFORMED) / len(completions))
    assert "malformed completion" in caplog.text
    # The verifier itself does not read the text of something that is not a string (a dict's repr holds `\boxed{3}`)
    grades = verifier.grade([None, {"content": r"\boxed{3}"}], ["3", "3"])
    assert [g.outcome for g in grades] == [Outcome.NO_ANSWER] * 2 and "malformed" in grades[1].detail


# -- linear extraction -----------------------------------------------------------------------------------------------


def test_extraction_is_linear_on_unclosed_boxes():
    # `\boxed{` opened and never closed: scanning to the end from each one took 33 s for 56k characters.
    cases = {
        "\\boxed{" * 30_000: None,
        "\\boxed{3} " + "\\boxed{\\frac{1}{" * 13_000: "3",
        "{" * 100_000 + "\\boxed{4}" + "}" * 100_000: "4",
        "Answer: " + "\\boxed{" * 30_000: "\\boxed{" * 30_000,  # no complete box in the line: the line itself
    }
    for text, expected in cases.items():
        assert len(text) > 200_000
        start = time.monotonic()
        answer = extract_answer(text)
        assert time.monotonic() - start < 1.0, text[:30]
        assert answer == expected, text[:30]


def test_extraction_unchanged_on_ordinary_text():
    # Cases the brace scanner must keep: nesting, escaped braces, `\\` before a box, a box inside a box.
    assert extract_answer(r"\boxed{\boxed{2}}") == "2"
    assert extract_answer(r"\boxed{a \} b}") == r"a \} b"
    assert extract_answer(r"x \\boxed{5}") == "5"
    assert extract_answer(r"\boxed {7} \boxed{8") == "7"
    assert extract_answer(r"} } \boxed{\left\{ 1 \right\}}") == r"\left\{ 1 \right\}"
    assert extract_answer("\\boxed{1}\n\\boxed{2}\nAnswer: \\boxed{\\frac{1}{2}} words") == r"\frac{1}{2}"


# -- the deadline covers sending; workers die with their parent ------------------------------------------------------


ECHO_WORKER = """
import json, sys
print("{}", flush=True)
for line in sys.stdin:
    print(json.dumps({"size": len(json.loads(line)["data"])}), flush=True)
"""


def test_deadline_covers_sending_to_a_stopped_worker(tmp_path):
    (tmp_path / "echo_worker.py").write_text(ECHO_WORKER)
    pool = WorkerPool("echo_worker", num_workers=1, env={"PYTHONPATH": str(tmp_path)})
    outcome = {}

    def send_one_megabyte():
        start = time.monotonic()
        try:
            outcome["reply"] = pool.request({"data": "x" * 1_000_000}, deadline_s=1.0)
        except WorkerTimeout:
            outcome["reply"] = "timeout"
        outcome["seconds"] = time.monotonic() - start

    try:
        assert pool.request({"data": "x"}, deadline_s=30) == {"size": 1}
        pid = pool._slots[0].proc.pid
        os.kill(pid, signal.SIGSTOP)  # a stopped worker reads nothing: the pipe fills after 64 KiB
        sender = threading.Thread(target=send_one_megabyte, daemon=True)
        sender.start()
        sender.join(timeout=10)
        hung = sender.is_alive()
        if hung:  # release the sender before failing
            os.kill(pid, signal.SIGKILL)
            sender.join(timeout=10)
        assert not hung, "the request hung on a stopped worker"
        assert outcome["reply"] == "timeout" and outcome["seconds"] < 1.0 + 2
        assert pool.request({"data": "x" * 1_000_000}, deadline_s=30) == {"size": 1_000_000}  # a fresh worker
        assert pool.restarts == 1
    finally:
        pool.close()


def _process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_busy_worker_dies_with_its_parent():
    script = textwrap.dedent(
        r"""
        import sys
        from trl_flowrl.rewards import MathVerifier
        verifier = MathVerifier(num_workers=1, parse_timeout=300, verify_timeout=300, hard_timeout=900)
        verifier.grade_one(r"\boxed{1}", "1")
        print(verifier.pool._slots[0].proc.pid, flush=True)
        huge = "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(200_000)) + "}"
        verifier.grade_one(huge, "3")  # minutes of parsing in the worker
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
    worker = None
    try:
        worker = int(trainer.stdout.readline())
        time.sleep(1.5)  # the worker is now busy on the huge request
        assert _process_state(worker) in ("R", "S", "D")
        trainer.kill()  # SIGKILL: no atexit, no cleanup in the parent
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _process_state(worker) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _process_state(worker) in (None, "Z"), "the worker outlived its parent"
    finally:
        trainer.kill()
        if worker is not None and _process_state(worker) not in (None, "Z"):
            os.kill(worker, signal.SIGKILL)


def test_watchdog_ends_a_busy_worker_when_the_parent_pipe_closes():
    # The fallback where PR_SET_PDEATHSIG is unavailable: the worker's reader thread sees its stdin close while the
    # main thread is busy, and ends the process.
    script = textwrap.dedent(
        """
        import time
        from trl_flowrl.rewards._procpool import serve

        def busy(request):
            while True:
                time.sleep(0.01)

        serve(busy, die_with_parent=False)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root)
    try:
        assert worker.stdout.readline().startswith(b"{")
        worker.stdin.write(b"{}\n")
        worker.stdin.flush()
        time.sleep(0.5)
        assert worker.poll() is None  # busy on the request
        worker.stdin.close()  # what the parent's death does to the pipe
        assert worker.wait(timeout=5) == 0
    finally:
        worker.kill()


def test_workers_started_from_a_short_lived_thread_outlive_it():
    # PR_SET_PDEATHSIG fires when the *thread* that started the worker ends: the pool starts them on its own thread.
    verifier = MathVerifier(num_workers=1, **FAST)
    verifier.pool.close()  # so that the thread below starts the worker
    thread = threading.Thread(target=lambda: verifier.pool.request({**_request(r"\boxed{1}", "1")}, 30))
    thread.start()
    thread.join()
    pid = next(slot.proc.pid for slot in verifier.pool._slots if slot.proc is not None)
    time.sleep(0.5)
    assert _process_state(pid) not in (None, "Z")
    restarts = verifier.pool.restarts
    assert [g.outcome for g in verifier.grade([r"\boxed{2}"] * 2, ["2"] * 2)] == [Outcome.CORRECT] * 2
    assert verifier.pool.restarts == restarts


def _request(completion, gold):
    return {"completion": completion, "gold": gold, "answer_format": "auto", "parse_timeout": 1, "verify_timeout": 1}
