"""ExGRPO's experience buffer: pure Python and torch state, no trainer, no communication.

The buffer holds, per question, the bucket (the success count `k` of its latest partially solved group) and the
distinct correct trajectories collected for it (token ids and the per-token log-probs of the policy that generated
them), plus the set of retired questions and the one-way warm-up/replay phase. Every process of a distributed run
holds an identical copy: the trainer feeds every copy the same calls in the same order, and every random draw comes
from a `random.Random` the caller passes in (seeded identically on every process).

Questions are identified by strings (a dataset column or a hash of the prompt, chosen by the trainer). With each
buffered question the buffer keeps the dataset row it came from (as JSON text), so that a replay needs nothing from the
dataset: any dataset TRL accepts, iterable ones included, can be replayed from.
"""

import json
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
    row: str | None = None  # the dataset row, as JSON text


def encode_row(row: dict) -> str:
    """A dataset row as JSON text (the buffer state must stay loadable with `torch.load(weights_only=True)`)."""
    try:
        return json.dumps(row, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"ExGRPO stores the dataset row of each buffered question so that it can be replayed, as JSON; this row "
            f"has a value JSON cannot hold ({error}). Convert the column to plain strings, numbers or lists first."
        ) from error


def bucket_weight(k: int, center: float, width: float) -> float:
    """Unnormalised Gaussian weight of bucket `k`: exp(-(k - center)² / (2 · width²))."""
    return math.exp(-((k - center) ** 2) / (2.0 * width**2))


# The bucket weightings of the official code (k successes out of K): its default "normal" and its variants.
QUESTION_SELECTIONS = ("gaussian", "linear", "sqrt", "linear_clip", "uniform")


def bucket_weights(
    ks: Sequence[int], selection: str, num_generations: int, center: float, width: float
) -> list[float]:
    """Unnormalised weight of each bucket k under a question selection (`"uniform"` has no bucket weights)."""
    K = num_generations
    if selection == "gaussian":
        return [bucket_weight(k, center, width) for k in ks]
    if selection == "linear":
        return [k / K for k in ks]
    if selection == "sqrt":
        return [math.sqrt(k / K) for k in ks]
    if selection == "linear_clip":
        return [k / K if k <= K / 2 else 0.5 for k in ks]
    raise ValueError(f"Unknown bucket weighting {selection!r}: expected one of {QUESTION_SELECTIONS[:-1]}.")


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
        question_selection: how `sample_questions` draws: `"gaussian"` (the paper), the official code's other bucket
            weightings `"linear"` (k / K), `"sqrt"` (sqrt(k / K)), `"linear_clip"` (k / K up to K / 2, then 0.5), or
            `"uniform"` over the buffered questions (no question selection).
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
        question_selection: str = "gaussian",
    ):
        if question_selection not in QUESTION_SELECTIONS:
            raise ValueError(f"question_selection must be one of {QUESTION_SELECTIONS}, got {question_selection!r}.")
        self.question_selection = question_selection
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
        # Insertion order of trajectories, kept only for the global cap; entries of evicted trajectories are skipped
        # lazily and compacted away, so the record stays within twice the live trajectories.
        self._order: deque[tuple[int, str]] = deque()

    # Phase -----------------------------------------------------------------------------------------------------------

    def maybe_start_replay(self, accuracy: float, threshold: float) -> bool:
        """Start replay (one-way) when `accuracy` strictly exceeds `threshold`. Returns True only on the switch."""
        if self.replay_started or not accuracy > threshold:
            return False
        self.replay_started = True
        return True

    # Groups ----------------------------------------------------------------------------------------------------------

    def record_group(self, question_id: str, num_successes: int, row: str | None = None) -> None:
        """Update a question from one group of K completions with `num_successes` correct ones.

        K correct: the question retires permanently and its trajectories are dropped (in both phases). 1..K-1 correct:
        its bucket becomes `num_successes` (only once replay has started: no experience is kept during warm-up), and
        `row` (the question's dataset row, from `encode_row`) is kept if none is yet. 0 correct: nothing changes.
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
            entry = self._questions.setdefault(question_id, _Question())
            entry.bucket = num_successes
            if entry.row is None:
                entry.row = row

    def needs_row(self, question_id: str) -> bool:
        """Whether `record_group` for this question would store a row it does not have yet."""
        entry = self._questions.get(question_id)
        return self.replay_started and question_id not in self._retired and (entry is None or entry.row is None)

    def encoded_row(self, question_id: str) -> str | None:
        """The dataset row a buffered question came from, as JSON text (see `encode_row`), or None if not kept."""
        entry = self._questions.get(question_id)
        return entry.row if entry is not None else None

    def row(self, question_id: str) -> dict | None:
        """The dataset row a buffered question came from, or None if not kept."""
        row = self.encoded_row(question_id)
        return json.loads(row) if row is not None else None

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
        if self.max_buffer_trajectories is not None:
            self._order.append((self._next_serial, question_id))
            if len(self._order) > 2 * self._num_trajectories + 64:
                self._compact_order()
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

    def _compact_order(self) -> None:
        live = {t.serial for e in self._questions.values() for t in e.trajectories}
        self._order = deque(item for item in self._order if item[0] in live)

    def drop_longer_than(self, max_length: int) -> int:
        """Drop stored trajectories of more than `max_length` tokens (e.g. after `max_completion_length` shrank).
        Returns how many were dropped; questions left without trajectories are no longer replayable."""
        dropped = 0
        for entry in self._questions.values():
            kept = [t for t in entry.trajectories if t.token_ids.numel() <= max_length]
            dropped += len(entry.trajectories) - len(kept)
            entry.trajectories = kept
        self._num_trajectories -= dropped
        if dropped and self.max_buffer_trajectories is not None:
            self._compact_order()
        return dropped

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
        """Probability of drawing each non-empty bucket: its weight renormalised over the non-empty buckets (for
        `"uniform"` question selection, the share of the questions in each bucket)."""
        buckets = self._buckets()
        keys = sorted(buckets)
        if self.question_selection == "uniform":
            weights = [float(len(buckets[k])) for k in keys]
        else:
            weights = self._bucket_weights(keys)
        total = sum(weights)
        return {k: w / total for k, w in zip(keys, weights)}

    def _bucket_weights(self, keys):
        return bucket_weights(
            keys, self.question_selection, self.num_generations, self.bucket_center, self.bucket_width
        )

    def sample_questions(self, n: int, rng: random.Random) -> list[str]:
        """Draw `n` distinct eligible questions: a bucket by its weight (`question_selection`) among the buckets that
        still hold undrawn questions, then a question uniformly inside it; with `"uniform"`, uniformly over the eligible
        questions (the paper's ablation without question selection). Raises if fewer than `n` are eligible."""
        buckets = self._buckets()
        available = sum(len(b) for b in buckets.values())
        if n > available:
            raise ValueError(f"Cannot draw {n} questions from a buffer with {available} eligible questions.")
        if self.question_selection == "uniform":
            pool = self.eligible_questions()
            return [pool.pop(rng.randrange(len(pool))) for _ in range(n)]
        drawn = []
        for _ in range(n):
            keys = sorted(k for k, b in buckets.items() if b)
            weights = self._bucket_weights(keys)
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

    def bucket_sizes(self) -> dict[int, int]:
        """Number of replayable questions in each bucket k = 1..K-1 (empty buckets included)."""
        sizes = dict.fromkeys(range(1, self.num_generations), 0)
        for k, questions in self._buckets().items():
            sizes[k] = len(questions)
        return sizes

    @property
    def num_questions(self) -> int:
        """Number of replayable questions (with at least one trajectory)."""
        return len(self.eligible_questions())

    @property
    def num_trajectories(self) -> int:
        return self._num_trajectories

    @property
    def num_retired(self) -> int:
        return len(self._retired)

    # State -----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain containers and flat tensors only, so that `torch.load(..., weights_only=True)` can read it."""
        question_ids, buckets, rows, traj_question, traj_serial, traj_length, ids, logps = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for index, (question_id, entry) in enumerate(self._questions.items()):
            question_ids.append(question_id)
            buckets.append(-1 if entry.bucket is None else entry.bucket)
            rows.append(entry.row)
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
            "rows": rows,
            "retired": sorted(self._retired),
            "next_serial": self._next_serial,
            "trajectory_question": torch.tensor(traj_question, dtype=torch.int64),
            "trajectory_serial": torch.tensor(traj_serial, dtype=torch.int64),
            "trajectory_length": torch.tensor(traj_length, dtype=torch.int64),
            "token_ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32),
            "logps": torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float32),
        }

    @staticmethod
    def check_state_dict(state: dict) -> None:
        """Raise a ValueError saying what is wrong if `state` is not a consistent `state_dict()` (a file edited or
        damaged on disk would otherwise fail deep inside `load_state_dict`, or load NaN log-probs into the loss)."""
        if not isinstance(state, dict):
            raise ValueError(f"the replay buffer state is a {type(state).__name__}, not a dict")
        kinds = {
            "num_generations": int,
            "replay_started": (bool, int),
            "question_ids": list,
            "buckets": list,
            "retired": list,
            "next_serial": int,
            "trajectory_question": torch.Tensor,
            "trajectory_serial": torch.Tensor,
            "trajectory_length": torch.Tensor,
            "token_ids": torch.Tensor,
            "logps": torch.Tensor,
        }
        for key, kind in kinds.items():
            if key not in state:
                raise ValueError(f"the replay buffer state has no {key!r} entry")
            if not isinstance(state[key], kind):
                raise ValueError(f"the replay buffer's {key!r} entry is a {type(state[key]).__name__}")
        question_ids, buckets, rows = state["question_ids"], state["buckets"], state.get("rows")
        if not all(isinstance(q, str) for q in question_ids) or len(set(question_ids)) != len(question_ids):
            raise ValueError("the replay buffer's question ids are not distinct strings")
        if not all(isinstance(q, str) for q in state["retired"]):
            raise ValueError("the replay buffer's retired question ids are not all strings")
        K = state["num_generations"]
        if len(buckets) != len(question_ids) or not all(
            isinstance(b, int) and (b == -1 or 1 <= b < K) for b in buckets
        ):
            raise ValueError(
                f"the replay buffer holds {len(question_ids)} questions but {len(buckets)} buckets, or a bucket "
                f"outside 1..{K - 1} (-1 for none)"
            )
        if rows and (len(rows) != len(question_ids) or not all(r is None or isinstance(r, str) for r in rows)):
            raise ValueError(f"the replay buffer holds {len(question_ids)} questions but {len(rows)} dataset rows")
        per_trajectory = [state[key] for key in ("trajectory_question", "trajectory_serial", "trajectory_length")]
        if (
            any(t.dim() != 1 or t.dtype.is_floating_point for t in per_trajectory)
            or len({t.numel() for t in per_trajectory}) != 1
        ):
            raise ValueError(
                "the replay buffer's trajectory_question, trajectory_serial and trajectory_length are not integer "
                f"vectors of one length (lengths {[t.numel() for t in per_trajectory]})"
            )
        questions, serials, lengths = per_trajectory
        token_ids, logps = state["token_ids"], state["logps"]
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or logps.dim() != 1:
            raise ValueError("the replay buffer's token_ids and logps are not flat vectors of ids and log-probs")
        if lengths.numel() and int(lengths.min()) < 1:
            raise ValueError(f"a stored trajectory has {int(lengths.min())} tokens (at least 1 expected)")
        total = int(lengths.sum())
        if total != token_ids.numel() or total != logps.numel():
            raise ValueError(
                f"the {lengths.numel()} stored trajectory lengths add up to {total} tokens, but the buffer holds "
                f"{token_ids.numel()} token ids and {logps.numel()} log-probs"
            )
        outside = questions[(questions < 0) | (questions >= len(question_ids))]
        if outside.numel():
            raise ValueError(
                f"a stored trajectory refers to question index {int(outside[0])}, but the buffer holds "
                f"{len(question_ids)} questions"
            )
        if serials.numel() and (
            len(set(serials.tolist())) != serials.numel() or int(serials.max()) >= state["next_serial"]
        ):
            raise ValueError("the stored trajectories' serial numbers are repeated or not below next_serial")
        if token_ids.numel() and int(token_ids.min()) < 0:
            raise ValueError(f"a stored token id is negative ({int(token_ids.min())})")
        if not torch.isfinite(logps).all():
            bad = (~torch.isfinite(logps)).sum().item()
            raise ValueError(f"{bad} stored log-probs are NaN or infinite (they would turn the loss into NaN)")

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; raises a ValueError (and changes nothing) if it is inconsistent."""
        self.check_state_dict(state)
        if state["num_generations"] != self.num_generations:
            raise ValueError(
                f"The saved replay buffer was built with num_generations={state['num_generations']}, but this run uses "
                f"{self.num_generations}. Resume with the same num_generations."
            )
        self.replay_started = bool(state["replay_started"])
        self._retired = set(state["retired"])
        self._next_serial = int(state["next_serial"])
        rows = state.get("rows") or [None] * len(state["question_ids"])  # states written before rows were kept
        self._questions = {
            question_id: _Question(bucket=None if bucket < 0 else int(bucket), row=row)
            for question_id, bucket, row in zip(state["question_ids"], state["buckets"], rows)
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
        self._order = deque(sorted(order)) if self.max_buffer_trajectories is not None else deque()
