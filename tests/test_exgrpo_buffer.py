"""ReplayBuffer: buckets, retirement, Gaussian bucket draw, dedup, caps, selection, and state round trip."""

import io
import math
import random
import re
from collections import Counter

import pytest
import torch

from trl_flowrl.exgrpo import ReplayBuffer, bucket_weight, select_trajectory


def started(num_generations=8, **kwargs) -> ReplayBuffer:
    buffer = ReplayBuffer(num_generations, **kwargs)
    assert buffer.maybe_start_replay(accuracy=1.0, threshold=0.35)
    return buffer


def add(buffer, question_id, ids, logp=-1.0):
    return buffer.add_trajectory(question_id, torch.tensor(ids), torch.full((len(ids),), logp))


def test_delayed_start_switches_only_when_accuracy_exceeds_threshold():
    buffer = ReplayBuffer(4)
    assert not buffer.maybe_start_replay(0.2, 0.35)
    assert not buffer.maybe_start_replay(7 / 20, 0.35)  # equal is not "exceeds"
    assert not buffer.replay_started
    assert buffer.maybe_start_replay(0.4, 0.35)
    assert buffer.replay_started
    assert not buffer.maybe_start_replay(0.9, 0.35)  # the switch happens once
    assert not buffer.maybe_start_replay(0.0, 0.35)  # and is one-way
    assert buffer.replay_started


def test_bucket_is_the_latest_partial_success_count_and_only_after_the_switch():
    buffer = ReplayBuffer(8)
    buffer.record_group("q", 3)
    assert buffer.bucket("q") is None  # warm-up keeps no experience

    buffer.maybe_start_replay(0.5, 0.35)
    buffer.record_group("q", 3)
    assert buffer.bucket("q") == 3
    buffer.record_group("q", 6)
    assert buffer.bucket("q") == 6
    buffer.record_group("q", 0)  # an all-wrong group leaves the question as it was
    assert buffer.bucket("q") == 6
    add(buffer, "q", [1, 2])
    buffer.record_group("q", 0)
    assert buffer.bucket("q") == 6 and len(buffer.trajectories("q")) == 1
    assert buffer.eligible_questions() == ["q"]


def test_retirement_is_permanent_drops_trajectories_and_happens_during_warm_up():
    buffer = ReplayBuffer(4)
    buffer.record_group("warm", 4)  # before the switch
    assert buffer.is_retired("warm")

    buffer.maybe_start_replay(1.0, 0.35)
    buffer.record_group("q", 2)
    add(buffer, "q", [5, 6, 7])
    add(buffer, "q", [5, 6])
    assert buffer.num_trajectories == 2 and buffer.num_questions == 1
    buffer.record_group("q", 4)
    assert buffer.is_retired("q")
    assert buffer.trajectories("q") == [] and buffer.num_trajectories == 0 and buffer.num_questions == 0
    # Never comes back: no bucket, no trajectory.
    buffer.record_group("q", 2)
    assert not add(buffer, "q", [9])
    assert buffer.bucket("q") is None and buffer.eligible_questions() == []
    assert buffer.num_retired == 2


def test_record_group_rejects_impossible_counts():
    with pytest.raises(ValueError, match="num_successes"):
        ReplayBuffer(4).record_group("q", 5)


def test_gaussian_bucket_probabilities_k8():
    # Worked by hand: w(k) = exp(-(k - 4)^2 / 2) -> w(4) = 1, w(3) = w(5) = e^-0.5 = 0.6065307,
    # w(2) = w(6) = e^-2 = 0.1353353, w(1) = w(7) = e^-4.5 = 0.0111090; sum = 2.5059499.
    buffer = started(8)
    for k in range(1, 8):
        buffer.record_group(f"q{k}", k)
        add(buffer, f"q{k}", [k])
    probabilities = buffer.bucket_probabilities()
    expected = {1: 0.0044331, 2: 0.0540056, 3: 0.2420362, 4: 0.3990503, 5: 0.2420362, 6: 0.0540056, 7: 0.0044331}
    assert probabilities.keys() == expected.keys()
    for k, p in expected.items():
        assert probabilities[k] == pytest.approx(p, abs=1e-6)


def test_bucket_probabilities_are_renormalised_over_non_empty_buckets():
    buffer = started(8)
    buffer.record_group("a", 1)
    buffer.record_group("b", 4)
    buffer.record_group("c", 6)  # a bucket but no trajectory: not drawable
    add(buffer, "a", [1])
    add(buffer, "b", [2])
    # w(1) = 0.0111090, w(4) = 1 -> 0.0111090 / 1.0111090 = 0.0109869
    assert buffer.bucket_probabilities() == pytest.approx({1: 0.0109869, 4: 0.9890131}, abs=1e-6)


def test_bucket_center_and_width_are_in_success_counts():
    assert bucket_weight(4, center=4.0, width=1.0) == 1.0
    assert bucket_weight(2, center=4.0, width=2.0) == pytest.approx(math.exp(-0.5))
    buffer = started(8, bucket_center=1.0, bucket_width=0.5)
    for k in (1, 2):
        buffer.record_group(f"q{k}", k)
        add(buffer, f"q{k}", [k])
    # w(1) = 1, w(2) = exp(-1 / 0.5) = e^-2 = 0.1353353
    assert buffer.bucket_probabilities() == pytest.approx({1: 0.8807971, 2: 0.1192029}, abs=1e-6)


def test_draws_follow_the_bucket_weights_and_are_uniform_inside_a_bucket():
    # K = 4, centre 2: w(1) = e^-0.5 = 0.6065307, w(2) = 1. Bucket 2 holds three questions, bucket 1 one.
    buffer = started(4)
    for question_id, k in (("a", 2), ("b", 2), ("c", 2), ("d", 1)):
        buffer.record_group(question_id, k)
        add(buffer, question_id, [ord(question_id)])
    rng = random.Random(1234)
    draws = 20_000
    counts = Counter(buffer.sample_questions(1, rng)[0] for _ in range(draws))
    p_bucket2 = 1 / (1 + math.exp(-0.5))  # 0.6224593
    for question_id in "abc":
        assert counts[question_id] / draws == pytest.approx(p_bucket2 / 3, abs=0.015)
    assert counts["d"] / draws == pytest.approx(1 - p_bucket2, abs=0.015)


def test_sampling_is_without_replacement_and_bounded_by_the_buffer():
    buffer = started(4)
    for i in range(5):
        buffer.record_group(f"q{i}", 1 + i % 3)
        add(buffer, f"q{i}", [i])
    drawn = buffer.sample_questions(5, random.Random(0))
    assert sorted(drawn) == [f"q{i}" for i in range(5)]
    with pytest.raises(ValueError, match="Cannot draw 6"):
        buffer.sample_questions(6, random.Random(0))


def test_same_seed_same_draws():
    buffer = started(8)
    for i in range(20):
        buffer.record_group(f"q{i}", 1 + i % 7)
        add(buffer, f"q{i}", [i])
    assert buffer.sample_questions(6, random.Random(7)) == buffer.sample_questions(6, random.Random(7))


def test_deduplication_by_exact_token_ids():
    buffer = started(4)
    buffer.record_group("q", 2)
    assert add(buffer, "q", [1, 2, 3], logp=-1.0)
    assert not add(buffer, "q", [1, 2, 3], logp=-2.0)  # same tokens, other log-probs: still a duplicate
    assert add(buffer, "q", [1, 2])  # a prefix is another trajectory
    assert add(buffer, "q", [1, 2, 4])
    assert add(buffer, "other", [1, 2, 3])  # dedup is per question
    assert [t.token_ids.tolist() for t in buffer.trajectories("q")] == [[1, 2, 3], [1, 2], [1, 2, 4]]
    assert buffer.trajectories("q")[0].logps.tolist() == [-1.0, -1.0, -1.0]
    assert buffer.num_trajectories == 4


def test_invalid_trajectories_are_refused():
    buffer = started(4)
    with pytest.raises(ValueError, match="as many log-probs"):
        buffer.add_trajectory("q", torch.tensor([1, 2]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="at least one"):
        buffer.add_trajectory("q", torch.tensor([], dtype=torch.long), torch.tensor([]))


def test_caps_evict_the_oldest_first():
    buffer = started(4, max_trajectories_per_question=2, max_buffer_trajectories=3)
    for question_id in "ab":
        buffer.record_group(question_id, 2)
    add(buffer, "a", [1])
    add(buffer, "a", [2])
    add(buffer, "a", [3])  # per-question cap: [1] goes
    assert [t.token_ids.tolist() for t in buffer.trajectories("a")] == [[2], [3]]
    add(buffer, "b", [10])
    add(buffer, "b", [11])  # global cap 3: the oldest overall, a's [2], goes
    assert [t.token_ids.tolist() for t in buffer.trajectories("a")] == [[3]]
    assert [t.token_ids.tolist() for t in buffer.trajectories("b")] == [[10], [11]]
    add(buffer, "b", [12])  # per-question cap first (b's [10]), then global is 3 again
    assert buffer.num_trajectories == 3
    add(buffer, "a", [4])  # global: a's [3] is the oldest live trajectory
    assert [t.token_ids.tolist() for t in buffer.trajectories("a")] == [[4]]
    assert [t.token_ids.tolist() for t in buffer.trajectories("b")] == [[11], [12]]


def test_select_trajectory_by_mean_entropy():
    assert select_trajectory([0.9, 0.2, 0.5], "lowest_entropy") == 1
    assert select_trajectory([0.9, 0.2, 0.5], "highest_entropy") == 0
    assert select_trajectory([0.3, 0.3, 0.7], "lowest_entropy") == 0  # ties: the oldest
    assert select_trajectory([0.4], "highest_entropy") == 0
    with pytest.raises(ValueError, match="at least one"):
        select_trajectory([], "lowest_entropy")
    with pytest.raises(ValueError, match="Unknown entropy selection"):
        select_trajectory([0.1], "random")


def test_state_round_trip_through_torch_save():
    buffer = started(4, max_buffer_trajectories=4)
    buffer.record_group("gone", 4)
    for i, question_id in enumerate(["q0", "q1", "q2"]):
        buffer.record_group(question_id, 1 + i)
        add(buffer, question_id, [i, i + 1], logp=-0.5 * (i + 1))
    add(buffer, "q1", [7, 8, 9], logp=-3.0)

    stream = io.BytesIO()
    torch.save(buffer.state_dict(), stream)
    stream.seek(0)
    restored = ReplayBuffer(4, max_buffer_trajectories=4)
    restored.load_state_dict(torch.load(stream, weights_only=True))

    assert restored.replay_started and restored.is_retired("gone")
    assert restored.num_trajectories == buffer.num_trajectories == 4
    for question_id in ["q0", "q1", "q2"]:
        assert restored.bucket(question_id) == buffer.bucket(question_id)
        for a, b in zip(restored.trajectories(question_id), buffer.trajectories(question_id), strict=True):
            assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logps, b.logps) and a.serial == b.serial
    assert restored.sample_questions(3, random.Random(3)) == buffer.sample_questions(3, random.Random(3))
    # Eviction order survives too: the next insertion evicts q0's trajectory in both.
    add(buffer, "q2", [42])
    add(restored, "q2", [42])
    assert buffer.trajectories("q0") == [] and restored.trajectories("q0") == []
    assert buffer.state_dict()["question_ids"] == restored.state_dict()["question_ids"]


def test_loading_a_state_with_another_group_size_fails():
    state = ReplayBuffer(4).state_dict()
    with pytest.raises(ValueError, match="num_generations=4"):
        ReplayBuffer(8).load_state_dict(state)


def _edit_lengths(state):
    state["trajectory_length"][0] += 1


def _edit_logps(state):
    state["logps"][1] = float("nan")


def _edit_question_index(state):
    state["trajectory_question"][0] = 5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_lengths, "lengths add up to 4 tokens, but the buffer holds 3 token ids and 3 log-probs"),
        (_edit_logps, "1 stored log-probs are NaN or infinite"),
        (_edit_question_index, "refers to question index 5, but the buffer holds 2 questions"),
        (lambda state: state.pop("logps"), "has no 'logps' entry"),
        (lambda state: state["buckets"].__setitem__(0, 4), "a bucket outside 1..3"),
    ],
)
def test_an_inconsistent_state_is_refused_and_changes_nothing(edit, message):
    buffer = started(4)
    for i, question_id in enumerate(["q0", "q1"]):
        buffer.record_group(question_id, 1 + i)
    add(buffer, "q0", [1, 2])
    add(buffer, "q1", [3])
    state = buffer.state_dict()
    edit(state)
    target = started(4)
    target.record_group("kept", 2)
    add(target, "kept", [9])
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(state)
    assert target.eligible_questions() == ["kept"] and target.num_trajectories == 1


def test_insertion_record_is_bounded():
    # Without a global cap nothing needs the insertion order: it is not kept at all.
    buffer = started(4)
    for i in range(200):
        buffer.record_group(f"q{i}", 2)
        add(buffer, f"q{i}", [i + 1])
        if i % 2:
            buffer.record_group(f"q{i}", 4)  # retired: its trajectory goes
    assert len(buffer._order) == 0 and buffer.num_trajectories == 100
    # With a cap, retired and evicted entries are compacted away: the record stays within twice the live ones (+64).
    buffer = started(4, max_buffer_trajectories=1000)
    for i in range(2000):
        buffer.record_group(f"q{i}", 2)
        add(buffer, f"q{i}", [i + 1])
        buffer.record_group(f"q{i}", 4)
        assert len(buffer._order) <= 2 * buffer.num_trajectories + 64 + 1
    assert buffer.num_trajectories == 0


def test_uniform_question_selection_ignores_buckets():
    buffer = started(8, question_selection="uniform")
    for i, k in enumerate([1, 4, 4, 4, 7]):
        buffer.record_group(f"q{i}", k)
        add(buffer, f"q{i}", [i + 1])
    draws = Counter()
    rng = random.Random(0)
    for _ in range(5000):
        draws.update(buffer.sample_questions(1, rng))
    # uniform over the 5 questions; the Gaussian draw would give q0 and q4 (buckets 1 and 7) almost nothing
    assert all(abs(draws[f"q{i}"] / 5000 - 0.2) < 0.03 for i in range(5))
    assert sorted(buffer.sample_questions(5, rng)) == [f"q{i}" for i in range(5)]
    assert buffer.bucket_probabilities() == pytest.approx({1: 0.2, 4: 0.6, 7: 0.2})
    buffer.question_selection = "gaussian"  # the same buffer: q0 and q4 (buckets 1 and 7) almost never drawn
    gaussian = Counter()
    for _ in range(2000):
        gaussian.update(buffer.sample_questions(1, rng))
    assert gaussian["q0"] + gaussian["q4"] < 0.05 * 2000
    with pytest.raises(ValueError, match="question_selection must be"):
        ReplayBuffer(8, question_selection="hardest")


@pytest.mark.parametrize(
    "selection, expected",
    [
        # weights for buckets 1, 4, 6 of K = 8, renormalised
        ("linear", [1 / 11, 4 / 11, 6 / 11]),
        ("sqrt", [math.sqrt(k / 8) / sum(math.sqrt(j / 8) for j in (1, 4, 6)) for k in (1, 4, 6)]),
        ("linear_clip", [0.125 / 1.125, 0.5 / 1.125, 0.5 / 1.125]),  # k/K up to K/2, then 0.5
    ],
)
def test_official_bucket_weighting_variants(selection, expected):
    buffer = started(8, question_selection=selection)
    for k in (1, 4, 6):
        buffer.record_group(f"q{k}", k)
        add(buffer, f"q{k}", [k])
    assert list(buffer.bucket_probabilities().values()) == pytest.approx(expected)


def test_bucket_sizes_rows_and_dropping_long_trajectories():
    buffer = started(4)
    buffer.record_group("a", 1, row='{"prompt": "a"}')
    buffer.record_group("a", 3, row='{"prompt": "other"}')  # the first row is kept
    buffer.record_group("b", 3)
    add(buffer, "a", [1, 2, 3])
    add(buffer, "a", [4])
    add(buffer, "b", [5, 6])
    assert buffer.bucket_sizes() == {1: 0, 2: 0, 3: 2}
    assert buffer.row("a") == {"prompt": "a"} and buffer.row("b") is None
    assert buffer.needs_row("b") and not buffer.needs_row("a")
    state = buffer.state_dict()
    restored = ReplayBuffer(4)
    restored.load_state_dict(state)
    assert restored.row("a") == {"prompt": "a"}
    assert buffer.drop_longer_than(2) == 1
    assert [t.token_ids.tolist() for t in buffer.trajectories("a")] == [[4]] and buffer.num_trajectories == 2
