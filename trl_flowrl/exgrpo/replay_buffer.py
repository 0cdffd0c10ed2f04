"""ExGRPO's experience buffer: pure Python and torch state, no trainer, no communication.

The buffer holds, per question, the bucket (the success count `k` of its latest partially solved group) and the
distinct correct trajectories collected for it (token ids and the per-token log-probs of the policy that generated
them), plus the set of retired questions and the one-way warm-up/replay phase. Every process of a distributed run
holds an identical copy: the trainer feeds every copy the same calls in the same order, and every random draw comes
from a `random.Random` the caller passes in (seeded identically on every process).

Questions are identified by strings (a dataset column or a hash of the prompt, chosen by the trainer).
"""

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Trajectory:
    """One stored completion: `token_ids` (T,) int32, `logps` (T,) float32, `serial` its insertion number."""

    token_ids: torch.Tensor
    logps: torch.Tensor
    serial: int


@dataclass
class _Question:
    bucket: int | None = None
    trajectories: list[Trajectory] = field(default_factory=list)


def bucket_weight(k: int, center: float, width: float) -> float:
    """Unnormalised Gaussian weight of bucket `k`: exp(-(k - center)² / (2 · width²))."""
    return math.exp(-((k - center) ** 2) / (2.0 * width**2))


def select_trajectory(mean_entropies: Sequence[float], selection: str) -> int:
    """Index of the trajectory to replay among candidates scored by mean per-token entropy.

    `selection` is `"lowest_entropy"` or `"highest_entropy"`; ties go to the earliest (oldest) candidate. The
    `"random"` selection needs no scores and is drawn by the trainer from the shared generator.
    """
    if len(mean_entropies) == 0:
        raise ValueError("select_trajectory needs at least one candidate.")
    indices = range(len(mean_entropies))
    if selection == "lowest_entropy":
        return min(indices, key=lambda i: mean_entropies[i])
    if selection == "highest_entropy":
        return max(indices, key=lambda i: mean_entropies[i])
    raise ValueError(f"Unknown entropy selection {selection!r}: expected 'lowest_entropy' or 'highest_entropy'.")


class ReplayBuffer:
    """Buckets, trajectories, retired questions and phase of ExGRPO.

    Args:
        num_generations: K, the group size. Bucket `k` holds questions whose latest partially solved group had `k`
            correct completions, 1 <= k <= K - 1.
        bucket_center: centre of the Gaussian over buckets, in success counts (`None`: K / 2).
        bucket_width: its standard deviation, in success counts.
        max_trajectories_per_question / max_buffer_trajectories: optional caps, oldest trajectory evicted first.

    Not handled here: anything about the model or the distribution of work across processes. Memory: 8 bytes per
    stored token (int32 id + float32 log-prob) plus a small per-trajectory overhead.
    """

    def __init__(
        self,
        num_generations: int,
        bucket_center: float | None = None,
        bucket_width: float = 1.0,
        max_trajectories_per_question: int | None = None,
        max_buffer_trajectories: int | None = None,
    ):
        if num_generations < 2:
            raise ValueError(f"num_generations must be at least 2, got {num_generations}.")
        if bucket_width <= 0:
            raise ValueError(f"bucket_width must be > 0, got {bucket_width}.")
        self.num_generations = num_generations
        self.bucket_center = num_generations / 2 if bucket_center is None else float(bucket_center)
        self.bucket_width = float(bucket_width)
        self.max_trajectories_per_question = max_trajectories_per_question
        self.max_buffer_trajectories = max_buffer_trajectories
        self.replay_started = False
        self._questions: dict[str, _Question] = {}
        self._retired: set[str] = set()
        self._num_trajectories = 0
        self._next_serial = 0
        # Insertion order of trajectories, for the global cap; entries of evicted trajectories are skipped lazily.
        self._order: deque[tuple[int, str]] = deque()

    # Phase -----------------------------------------------------------------------------------------------------------

    def maybe_start_replay(self, accuracy: float, threshold: float) -> bool:
        """Start replay (one-way) when `accuracy` strictly exceeds `threshold`. Returns True only on the switch."""
        if self.replay_started or not accuracy > threshold:
            return False
        self.replay_started = True
        return True

    # Groups ----------------------------------------------------------------------------------------------------------

    def record_group(self, question_id: str, num_successes: int) -> None:
        """Update a question from one group of K completions with `num_successes` correct ones.

        K correct: the question retires permanently and its trajectories are dropped (in both phases). 1..K-1 correct:
        its bucket becomes `num_successes` (only once replay has started: no experience is kept during warm-up).
        0 correct: nothing changes.
        """
        if not 0 <= num_successes <= self.num_generations:
            raise ValueError(f"num_successes must be in [0, {self.num_generations}], got {num_successes}.")
        if question_id in self._retired:
            return
        if num_successes == self.num_generations:
            self._retired.add(question_id)
            entry = self._questions.pop(question_id, None)
            if entry is not None:
                self._num_trajectories -= len(entry.trajectories)
        elif num_successes > 0 and self.replay_started:
            self._questions.setdefault(question_id, _Question()).bucket = num_successes

    def is_retired(self, question_id: str) -> bool:
        return question_id in self._retired

    # Trajectories ----------------------------------------------------------------------------------------------------

    def add_trajectory(self, question_id: str, token_ids: torch.Tensor | Sequence[int], logps: torch.Tensor) -> bool:
        """Store a correct trajectory unless the question is retired or already holds the same token ids.

        `token_ids` (T,) and `logps` (T,) must have the same length T >= 1. Returns whether it was stored. Applies the
        caps afterwards (the new trajectory may itself be evicted only if a cap is smaller than 1, which the config
        forbids).
        """
        token_ids = torch.as_tensor(token_ids).detach().to("cpu", torch.int32).flatten()
        logps = torch.as_tensor(logps).detach().to("cpu", torch.float32).flatten()
        if token_ids.numel() == 0 or token_ids.numel() != logps.numel():
            raise ValueError(
                f"A trajectory needs as many log-probs as token ids (and at least one); got {token_ids.numel()} ids "
                f"and {logps.numel()} log-probs."
            )
        if question_id in self._retired:
            return False
        entry = self._questions.setdefault(question_id, _Question())
        for stored in entry.trajectories:
            if stored.token_ids.numel() == token_ids.numel() and torch.equal(stored.token_ids, token_ids):
                return False
        entry.trajectories.append(Trajectory(token_ids.clone(), logps.clone(), self._next_serial))
        self._order.append((self._next_serial, question_id))
        self._next_serial += 1
        self._num_trajectories += 1
        cap = self.max_trajectories_per_question
        while cap is not None and len(entry.trajectories) > cap:
            entry.trajectories.pop(0)
            self._num_trajectories -= 1
        cap = self.max_buffer_trajectories
        while cap is not None and self._num_trajectories > cap:
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        while self._order:
            serial, question_id = self._order.popleft()
            entry = self._questions.get(question_id)
            # Per-question lists are in serial order and only lose their oldest items, so the oldest live trajectory
            # of the question is its first one.
            if entry is not None and entry.trajectories and entry.trajectories[0].serial == serial:
                entry.trajectories.pop(0)
                self._num_trajectories -= 1
                return

    def trajectories(self, question_id: str) -> list[Trajectory]:
        """The stored trajectories of a question, oldest first (empty if none)."""
        entry = self._questions.get(question_id)
        return list(entry.trajectories) if entry is not None else []

    def bucket(self, question_id: str) -> int | None:
        entry = self._questions.get(question_id)
        return entry.bucket if entry is not None else None

    # Selection -------------------------------------------------------------------------------------------------------

    def eligible_questions(self) -> list[str]:
        """Questions that can be replayed (at least one trajectory and a bucket), sorted by id."""
        return sorted(q for q, e in self._questions.items() if e.trajectories and e.bucket is not None)

    def _buckets(self) -> dict[int, list[str]]:
        buckets: dict[int, list[str]] = {}
        for question_id in self.eligible_questions():
            buckets.setdefault(self._questions[question_id].bucket, []).append(question_id)
        return buckets

    def bucket_probabilities(self) -> dict[int, float]:
        """Probability of drawing each non-empty bucket: Gaussian weights renormalised over the non-empty buckets."""
        weights = {k: bucket_weight(k, self.bucket_center, self.bucket_width) for k in sorted(self._buckets())}
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items()}

    def sample_questions(self, n: int, rng: random.Random) -> list[str]:
        """Draw `n` distinct eligible questions: a bucket by Gaussian weight over the buckets that still hold
        undrawn questions, then a question uniformly inside it. Raises if fewer than `n` questions are eligible."""
        buckets = self._buckets()
        available = sum(len(b) for b in buckets.values())
        if n > available:
            raise ValueError(f"Cannot draw {n} questions from a buffer with {available} eligible questions.")
        drawn = []
        for _ in range(n):
            keys = sorted(k for k, b in buckets.items() if b)
            weights = [bucket_weight(k, self.bucket_center, self.bucket_width) for k in keys]
            threshold = rng.random() * sum(weights)
            chosen = keys[-1]  # guards against the float sum ending a hair below `threshold`
            cumulative = 0.0
            for k, w in zip(keys, weights):
                cumulative += w
                if threshold < cumulative:
                    chosen = k
                    break
            questions = buckets[chosen]
            drawn.append(questions.pop(rng.randrange(len(questions))))
        return drawn

    # Sizes -----------------------------------------------------------------------------------------------------------

    @property
    def num_questions(self) -> int:
        """Number of replayable questions (with at least one trajectory)."""
        return sum(1 for e in self._questions.values() if e.trajectories and e.bucket is not None)

    @property
    def num_trajectories(self) -> int:
        return self._num_trajectories

    @property
    def num_retired(self) -> int:
        return len(self._retired)

    # State -----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain containers and flat tensors only, so that `torch.load(..., weights_only=True)` can read it."""
        question_ids, buckets, traj_question, traj_serial, traj_length, ids, logps = [], [], [], [], [], [], []
        for index, (question_id, entry) in enumerate(self._questions.items()):
            question_ids.append(question_id)
            buckets.append(-1 if entry.bucket is None else entry.bucket)
            for t in entry.trajectories:
                traj_question.append(index)
                traj_serial.append(t.serial)
                traj_length.append(t.token_ids.numel())
                ids.append(t.token_ids)
                logps.append(t.logps)
        return {
            "num_generations": self.num_generations,
            "replay_started": self.replay_started,
            "question_ids": question_ids,
            "buckets": buckets,
            "retired": sorted(self._retired),
            "next_serial": self._next_serial,
            "trajectory_question": torch.tensor(traj_question, dtype=torch.int64),
            "trajectory_serial": torch.tensor(traj_serial, dtype=torch.int64),
            "trajectory_length": torch.tensor(traj_length, dtype=torch.int64),
            "token_ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32),
            "logps": torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float32),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_generations"] != self.num_generations:
            raise ValueError(
                f"The saved replay buffer was built with num_generations={state['num_generations']}, but this run uses "
                f"{self.num_generations}. Resume with the same num_generations."
            )
        self.replay_started = bool(state["replay_started"])
        self._retired = set(state["retired"])
        self._next_serial = int(state["next_serial"])
        self._questions = {
            question_id: _Question(bucket=None if bucket < 0 else int(bucket))
            for question_id, bucket in zip(state["question_ids"], state["buckets"])
        }
        lengths = state["trajectory_length"].tolist()
        ids = torch.split(state["token_ids"], lengths) if lengths else []
        logps = torch.split(state["logps"], lengths) if lengths else []
        questions = list(self._questions.values())
        order = []
        for q_index, serial, t_ids, t_logps in zip(
            state["trajectory_question"].tolist(), state["trajectory_serial"].tolist(), ids, logps
        ):
            questions[q_index].trajectories.append(Trajectory(t_ids.clone(), t_logps.clone(), serial))
            order.append((serial, state["question_ids"][q_index]))
        self._num_trajectories = len(order)
        self._order = deque(sorted(order))
