"""FlowRL's buffer of past rollouts, for replay (a departure from the paper: see `FlowRLConfig.replay_share`).

Trajectory balance with summed or length-divided log-probs and the raw reward is zero for every completion exactly
when the policy is the target p*, whichever distribution sampled the completions (as long as every completion can be
sampled). So a completion generated some steps ago still pulls the policy toward p*, and replaying it costs a
forward pass instead of a generation. The buffer keeps, per prompt, the newest distinct completions with what their
residual needs that the current policy cannot recompute cheaply: the reward, the reference log-probs (the reference is
fixed), optionally the sampling policy's log-probs (for an importance weight), and the step that generated them.

Pure Python and torch state, no trainer and no communication: every process of a distributed run holds an identical
copy because the trainer feeds every copy the same rows in the same order and draws with a `random.Random` seeded
identically on every process. Prompts are identified by a key the trainer chooses (a digest of the prompt's token ids)
and stored with their token ids, so a replay needs nothing from the dataset (iterable datasets included).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


REPLAY_SAMPLINGS = ("uniform", "reward")
_STATE_FORMAT = 1


@dataclass
class StoredRollout:
    """One stored completion of a prompt. Tensors are (T,) with T its number of tokens (EOS included when there)."""

    completion_ids: torch.Tensor  # int32
    ref_logps: torch.Tensor  # float32, log π_ref of each token
    behaviour_logps: torch.Tensor | None  # float32, log-probs of the policy that sampled it, when kept
    reward: float
    step: int  # the global step at which it was generated
    serial: int  # insertion number, for the age order of eviction


@dataclass
class _Prompt:
    prompt_ids: torch.Tensor  # (P,) int32
    rows: OrderedDict[str, StoredRollout] = field(default_factory=OrderedDict)  # by completion digest, oldest first


def token_digest(ids: torch.Tensor) -> str:
    """A digest of a sequence of token ids (the same on every process and platform)."""
    return hashlib.sha1(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def weighted_sample(weights: list[float], k: int, rng: random.Random) -> list[int]:
    """`k` distinct indices drawn one after another, each with probability proportional to its weight among those
    left (`k` <= the number of positive weights)."""
    left = list(range(len(weights)))
    chosen = []
    for _ in range(k):
        total = sum(weights[i] for i in left)
        threshold, cumulative = rng.random() * total, 0.0
        pick = left[-1]
        for i in left:
            cumulative += weights[i]
            if cumulative > threshold:
                pick = i
                break
        chosen.append(pick)
        left.remove(pick)
    return chosen


class RolloutBuffer:
    """Per-prompt store of past completions, deduplicated and bounded.

    Args:
        max_per_prompt: the newest this many distinct completions of a prompt are kept (older ones evicted first).
        max_rows: at most this many completions in all; beyond it the oldest, over all prompts, are evicted.
        keep_behaviour_logps: also store the sampling policy's log-probs of each completion.

    Memory: 8 bytes per stored token (int32 id and float32 reference log-prob), 12 with the behaviour log-probs, plus
    each prompt's ids.
    """

    def __init__(self, max_per_prompt: int, max_rows: int, keep_behaviour_logps: bool = False):
        if max_per_prompt < 1 or max_rows < 1:
            raise ValueError(f"max_per_prompt and max_rows must be positive, got {max_per_prompt} and {max_rows}.")
        self.max_per_prompt = max_per_prompt
        self.max_rows = max_rows
        self.keep_behaviour_logps = keep_behaviour_logps
        self._prompts: dict[str, _Prompt] = {}
        # (prompt key, completion digest, serial) in insertion order; entries evicted per prompt are skipped lazily.
        self._age_order: deque[tuple[str, str, int]] = deque()
        self._next_serial = 0
        self.num_rows = 0

    @property
    def num_prompts(self) -> int:
        return len(self._prompts)

    def rows(self, prompt_key: str) -> list[StoredRollout]:
        prompt = self._prompts.get(prompt_key)
        return [] if prompt is None else list(prompt.rows.values())

    def add(
        self,
        prompt_key: str,
        prompt_ids: torch.Tensor,
        completion_ids: torch.Tensor,
        ref_logps: torch.Tensor,
        reward: float,
        step: int,
        behaviour_logps: torch.Tensor | None = None,
    ) -> bool:
        """Store one completion (tensors (T,) of its tokens). Returns False, storing nothing, for a completion already
        stored for this prompt."""
        if completion_ids.numel() == 0 or ref_logps.shape != completion_ids.shape:
            raise ValueError("A stored completion needs at least one token and one reference log-prob per token.")
        if self.keep_behaviour_logps and (behaviour_logps is None or behaviour_logps.shape != completion_ids.shape):
            raise ValueError("This buffer keeps the sampling policy's log-probs: pass one per token.")
        if not math.isfinite(reward):
            raise ValueError(f"A stored completion needs a finite reward, got {reward}.")
        logps = (
            [ref_logps] if behaviour_logps is None or not self.keep_behaviour_logps else [ref_logps, behaviour_logps]
        )
        if not all(bool(torch.isfinite(x).all()) for x in logps):
            raise ValueError("A stored completion needs finite log-probs (a NaN or inf would poison its residual).")
        prompt = self._prompts.get(prompt_key)
        if prompt is None:
            prompt = self._prompts[prompt_key] = _Prompt(prompt_ids.detach().to("cpu", torch.int32).clone())
        digest = token_digest(completion_ids)
        if digest in prompt.rows:
            return False
        prompt.rows[digest] = StoredRollout(
            completion_ids=completion_ids.detach().to("cpu", torch.int32).clone(),
            ref_logps=ref_logps.detach().to("cpu", torch.float32).clone(),
            behaviour_logps=(
                behaviour_logps.detach().to("cpu", torch.float32).clone() if self.keep_behaviour_logps else None
            ),
            reward=float(reward),
            step=int(step),
            serial=self._next_serial,
        )
        self._age_order.append((prompt_key, digest, self._next_serial))
        self._next_serial += 1
        self.num_rows += 1
        while len(prompt.rows) > self.max_per_prompt:
            prompt.rows.popitem(last=False)
            self.num_rows -= 1
        self._evict_over_total()
        return True

    def _evict_over_total(self) -> None:
        while self.num_rows > self.max_rows:
            prompt_key, digest, serial = self._age_order.popleft()
            prompt = self._prompts.get(prompt_key)
            if prompt is not None and digest in prompt.rows and prompt.rows[digest].serial == serial:
                del prompt.rows[digest]
                self.num_rows -= 1
                if not prompt.rows:
                    del self._prompts[prompt_key]
        if len(self._age_order) > 2 * self.num_rows + 1024:  # drop the entries of rows evicted per prompt
            live = [(k, d, r.serial) for k, p in self._prompts.items() for d, r in p.rows.items()]
            self._age_order = deque(sorted(live, key=lambda entry: entry[2]))

    def eligible_prompts(self, group_size: int) -> list[str]:
        """Prompts with at least `group_size` stored completions (a whole group can be replayed), oldest first."""
        return [key for key, prompt in self._prompts.items() if len(prompt.rows) >= group_size]

    def draw_groups(
        self, num_groups: int, group_size: int, rng: random.Random, sampling: str = "uniform", temperature: float = 1.0
    ) -> list[tuple[str, torch.Tensor, list[StoredRollout]]]:
        """Up to `num_groups` groups, each of `group_size` distinct stored completions of one prompt: prompts drawn
        uniformly without replacement among the eligible ones; inside a prompt, completions drawn uniformly
        (`"uniform"`) or with probability softmax(reward / temperature) (`"reward"`), without replacement.

        Returns (prompt key, prompt ids, completions) per group.
        """
        if sampling not in REPLAY_SAMPLINGS:
            raise ValueError(f"sampling must be one of {REPLAY_SAMPLINGS}, got {sampling!r}.")
        eligible = self.eligible_prompts(group_size)
        groups = []
        for key in rng.sample(eligible, min(num_groups, len(eligible))):
            prompt = self._prompts[key]
            rows = list(prompt.rows.values())
            if sampling == "uniform":
                picked = rng.sample(rows, group_size)
            else:
                top = max(row.reward for row in rows)
                weights = [math.exp((row.reward - top) / temperature) for row in rows]
                picked = [rows[i] for i in weighted_sample(weights, group_size, rng)]
            groups.append((key, prompt.prompt_ids, picked))
        return groups

    def drop_longer_than(self, max_tokens: int) -> int:
        """Remove stored completions longer than `max_tokens` (a resumed run that generates shorter ones); returns
        how many."""
        dropped = 0
        for key in list(self._prompts):
            prompt = self._prompts[key]
            for digest in [d for d, row in prompt.rows.items() if row.completion_ids.numel() > max_tokens]:
                del prompt.rows[digest]
                dropped += 1
            if not prompt.rows:
                del self._prompts[key]
        self.num_rows -= dropped
        return dropped

    # Checkpoints: plain tensors, lists and numbers, loadable with torch.load(weights_only=True).

    def state_dict(self) -> dict:
        prompts = list(self._prompts.items())
        rows = sorted(
            ((index, row) for index, (_, prompt) in enumerate(prompts) for row in prompt.rows.values()),
            key=lambda item: item[1].serial,
        )

        def cat(tensors, dtype):
            return torch.cat(tensors) if tensors else torch.zeros(0, dtype=dtype)

        return {
            "format": _STATE_FORMAT,
            "prompt_keys": [key for key, _ in prompts],
            "prompt_ids": cat([p.prompt_ids for _, p in prompts], torch.int32),
            "prompt_lengths": torch.tensor([p.prompt_ids.numel() for _, p in prompts], dtype=torch.int64),
            "row_prompt": torch.tensor([index for index, _ in rows], dtype=torch.int64),
            "completion_ids": cat([r.completion_ids for _, r in rows], torch.int32),
            "lengths": torch.tensor([r.completion_ids.numel() for _, r in rows], dtype=torch.int64),
            "ref_logps": cat([r.ref_logps for _, r in rows], torch.float32),
            "behaviour_logps": cat([r.behaviour_logps for _, r in rows], torch.float32)
            if self.keep_behaviour_logps
            else None,
            "rewards": torch.tensor([r.reward for _, r in rows], dtype=torch.float64),
            "steps": torch.tensor([r.step for _, r in rows], dtype=torch.int64),
            "serials": torch.tensor([r.serial for _, r in rows], dtype=torch.int64),
            "next_serial": self._next_serial,
        }

    @staticmethod
    def check_state_dict(state: dict) -> None:
        """Raise a ValueError saying what is inconsistent in a state read from disk."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"replay buffer format {state.get('format')!r}, this version reads {_STATE_FORMAT}")
        num_prompts, num_rows = len(state["prompt_keys"]), state["lengths"].numel()
        total = int(state["lengths"].sum())
        checks = [
            (state["prompt_lengths"].numel() == num_prompts, "one prompt length per prompt key"),
            (int(state["prompt_lengths"].sum()) == state["prompt_ids"].numel(), "prompt ids of the stated lengths"),
            (bool((state["lengths"] > 0).all()), "a positive length for every completion"),
            (state["completion_ids"].numel() == total, "completion ids of the stated lengths"),
            (state["ref_logps"].numel() == total, "one reference log-prob per completion token"),
            (
                state["behaviour_logps"] is None or state["behaviour_logps"].numel() == total,
                "one sampling log-prob per completion token",
            ),
            (
                all(state[name].numel() == num_rows for name in ("row_prompt", "rewards", "steps", "serials")),
                "a prompt, reward, step and serial for every completion",
            ),
            (
                num_rows == 0
                or (int(state["row_prompt"].min()) >= 0 and int(state["row_prompt"].max()) < num_prompts),
                "completions of listed prompts only",
            ),
            (bool(torch.isfinite(state["rewards"]).all()), "finite rewards"),
            (
                all(
                    x is None or bool(torch.isfinite(x).all()) for x in (state["ref_logps"], state["behaviour_logps"])
                ),
                "finite log-probs",
            ),
            (len(set(state["prompt_keys"])) == num_prompts, "distinct prompt keys"),
            (len(set(state["serials"].tolist())) == num_rows, "distinct serials"),
            (num_rows == 0 or int(state["serials"].max()) < int(state["next_serial"]), "serials below next_serial"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"the replay buffer's state does not have {what}")
        # Loading keys completions by their tokens: a repeated one would silently replace the first.
        completions = torch.split(state["completion_ids"], state["lengths"].tolist())
        if len({(p, token_digest(ids)) for p, ids in zip(state["row_prompt"].tolist(), completions)}) != num_rows:
            raise ValueError("the replay buffer's state does not have distinct completions under each prompt")

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (checked with `check_state_dict`), then apply this buffer's bounds."""
        self.check_state_dict(state)
        if self.keep_behaviour_logps and state["behaviour_logps"] is None:
            raise ValueError(
                "the replay buffer was saved without the sampling policy's log-probs, which this run's importance "
                "weight needs"
            )
        keep_behaviour = self.keep_behaviour_logps
        self._prompts, self._age_order, self.num_rows = {}, deque(), 0
        prompt_ids = torch.split(state["prompt_ids"], state["prompt_lengths"].tolist())
        for key, ids in zip(state["prompt_keys"], prompt_ids):
            self._prompts[key] = _Prompt(ids.clone())
        lengths = state["lengths"].tolist()
        columns = [torch.split(state["completion_ids"], lengths), torch.split(state["ref_logps"], lengths)]
        behaviour = torch.split(state["behaviour_logps"], lengths) if keep_behaviour else [None] * len(lengths)
        fields = zip(
            state["row_prompt"].tolist(),
            *columns,
            behaviour,
            state["rewards"].tolist(),
            state["steps"].tolist(),
            state["serials"].tolist(),
        )
        for index, ids, ref, beh, reward, step, serial in fields:
            key = state["prompt_keys"][index]
            row = StoredRollout(ids.clone(), ref.clone(), None if beh is None else beh.clone(), reward, step, serial)
            self._prompts[key].rows[token_digest(ids)] = row
            self._age_order.append((key, token_digest(ids), serial))
            self.num_rows += 1
        for key in [k for k, p in self._prompts.items() if not p.rows]:
            del self._prompts[key]
        self._next_serial = int(state["next_serial"])
        for prompt in self._prompts.values():
            while len(prompt.rows) > self.max_per_prompt:
                prompt.rows.popitem(last=False)
                self.num_rows -= 1
        self._evict_over_total()
