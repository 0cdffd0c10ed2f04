import hashlib
import json
import math
import os
import random
import textwrap
import time
import zipfile
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, nanmax, nanmin, pad

from .exgrpo_config import ExGRPOConfig
from .objective import aggregate_loss, exgrpo_per_token_loss
from .replay_buffer import ReplayBuffer, Trajectory, encode_row, select_trajectory


logger = get_logger(__name__)

REPLAY_STATE_NAME = "exgrpo_replay_state.pt"


def prompt_question_id(prompt) -> str:
    """A stable id for a prompt (text or list of messages): the SHA-1 of its canonical JSON."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class _GenerationPlan:
    """What one generation batch replays, computed identically on every process (local rows are per process)."""

    group_question_ids: list[str]  # one per global group, after requeue, retirement replacement and replay
    group_rows: list[str]  # the dataset row (JSON) of each global group
    replayed_slots: list[int] = field(default_factory=list)  # global groups that carry a replayed trajectory
    substitutions: dict[int, Trajectory] = field(default_factory=dict)  # local row -> stored trajectory
    num_replayed: int = 0  # global number of replayed groups
    num_replaced: int = 0  # global number of retired questions replaced by other ones
    chosen_entropies: list[float] = field(default_factory=list)  # local, of the replayed trajectories


class _MergeTrajectoriesCallback(TrainerCallback):
    """Merges every process's trajectories collected during an optimizer step into every process's buffer.

    `on_step_end` runs on every process after each optimizer step and before the checkpoint of that step is saved,
    so a checkpoint always holds everything collected up to it.
    """

    def __init__(self, trainer: "ExGRPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._merge_pending_trajectories()


class ExGRPOTrainer(GRPOTrainer):
    """
    Trainer for ExGRPO (Experiential Group Relative Policy Optimization), GRPO that learns from its past successes.

    ExGRPO (https://huggingface.co/papers/2510.02245) keeps the distinct correct trajectories of partially solved
    questions in a replay buffer and, once a generation batch's accuracy has first exceeded a threshold, replays some
    of them: a buffered question (bucket drawn by a Gaussian over its latest success count, question uniform inside
    the bucket) gets its lowest-entropy stored trajectory plus `num_generations - 1` fresh completions, and the
    advantage is computed by TRL over that mixed group. Replayed tokens are weighted by `f(w) = w / (w + 0.1)`,
    `w = π_θ / π_stored`, without clipping. See [`ExGRPOConfig`] for every option and `objective.py` for the loss.

    Same constructor and machinery as [`~trl.GRPOTrainer`] (transformers or vLLM generation, accelerate, PEFT,
    logging). How it hooks into TRL, without copying its generation code:

    - `_generate_and_score_completions` plans the batch before calling `super()`, on the global list of groups
      (question ids and rows gathered from every process): `floor(replay_ratio * questions)` groups (taken from the
      end of each process's batch, interleaved across processes) are replaced by buffered questions; the fresh
      questions they displace are skipped for this epoch (or requeued, `displaced_questions="requeue"`); groups of
      retired questions are replaced by other unretired dataset questions (drawn uniformly, possibly one already in
      the batch). A question may occur both fresh and replayed in one batch; each of its groups updates its bucket in
      turn. After `super()`, it updates the buckets, retirement and phase from the rewards of all processes, and adds
      per-row keys for the loss. Completions no reward function could score (or scored ±inf) are not trained on.
    - `_generate_single_turn` substitutes one of the K fresh completions of each replayed group by the stored
      trajectory (and its log-probs for vLLM's sampling log-probs). TRL then decodes, rewards and pads it like any
      completion. One fresh completion per replayed group is generated and discarded: the price of not copying TRL's
      generation code.
    - `_compute_loss` applies the mixed objective and captures, for free, the log-probs of the correct fresh rows to
      store (the sampling policy's: TRL's `old_per_token_logps` when it computed them, else the first forward pass).
    - A callback merges the collected trajectories of all processes into every process's buffer after each optimizer
      step; the buffer state is written with the optimizer state of each checkpoint (before it is pushed or older ones
      rotated), and on resume read by the main process and broadcast.
    - Metrics under `replay/`: phase, rollout accuracy, buffer questions / trajectories / bucket sizes, retired and
      replaced questions, replayed fraction, distinct fresh and replayed questions, the most replays of one question,
      the replayed rows' reward, their share of the loss, shaped weight, chosen entropy; a `replayed` column in the
      completions table.

    Any dataset TRL accepts works, iterable ones included: the buffer keeps each buffered question's dataset row, so
    a replay reads nothing back from the dataset. With an iterable dataset a retired question that comes round again
    is trained (a stream cannot be drawn from to replace it). Not handled (refused at construction): tools,
    `rollout_func`, `environment_factory` (they generate in TRL's multi-turn loop, which a stored completion cannot
    enter without copying it) and vision-language models. An exact resume needs a checkpoint at a generation
    boundary, i.e. `gradient_accumulation_steps` a multiple of `steps_per_generation * num_iterations` (TRL's own
    condition for resuming a generation batch). With vLLM, TRL's `sampling/*` metrics include replayed rows.
    """

    _tag_names = ["trl", "exgrpo"]
    _name = "ExGRPO"
    _paper = {
        "title": "ExGRPO: Learning to Reason from Experience",
        "id": "2510.02245",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhan2025exgrpo,
                title        = {{ExGRPO: Learning to Reason from Experience}},
                author       = {Runzhe Zhan and Yafu Li and Zhi Wang and Xiaoye Qu and Dongrui Liu and Jing Shao and Derek F. Wong and Yu Cheng},
                year         = 2025,
                eprint       = {arXiv:2510.02245},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: ExGRPOConfig | None = None, train_dataset=None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = ExGRPOConfig(f"{model_name.split('/')[-1]}-ExGRPO")
        elif not isinstance(args, ExGRPOConfig):
            raise TypeError(f"ExGRPOTrainer needs an ExGRPOConfig, got {type(args).__name__}.")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name):
                raise ValueError(
                    f"ExGRPOTrainer does not support `{name}`: replay substitutes a stored completion for one of TRL's "
                    "single-turn generations, while tools, rollout functions and environments generate several turns "
                    "(and tool outputs) in TRL's own loop, which cannot take a stored trajectory without copying it."
                )
        # Worded as GRPOTrainer's own error, so that code (and TRL's tests) written against GRPOTrainer see the error
        # they expect.
        if train_dataset is None:
            raise ValueError(
                "`train_dataset` is required: ExGRPOTrainer trains on a `datasets.Dataset` or "
                "`datasets.IterableDataset` (an `environment_factory`, GRPOTrainer's alternative, is not supported)."
            )
        if not isinstance(train_dataset, (Dataset, IterableDataset)):
            raise ValueError(
                "ExGRPOTrainer needs a train_dataset that is a `datasets.Dataset` or `datasets.IterableDataset`, got "
                f"{type(train_dataset).__name__}."
            )
        columns = train_dataset.column_names  # None for an iterable dataset of unknown features
        if args.question_id_column is not None and columns is not None and args.question_id_column not in columns:
            raise ValueError(
                f"question_id_column={args.question_id_column!r} is not a column of the train dataset (columns: "
                f"{columns})."
            )

        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

        if self._is_vlm:
            raise ValueError("ExGRPOTrainer does not support vision-language models (a processor with images).")

        self._warned_missing_id = False
        # For a map-style dataset, the unique question ids in dataset order: the pool from which retired questions are
        # replaced. An iterable dataset cannot be drawn from, so there a retired question that comes back is trained.
        self._dataset_question_ids: list[str] | None = None
        self._question_index: dict[str, int] = {}
        if isinstance(self.train_dataset, Dataset):
            prompts = self.train_dataset["prompt"]
            if args.question_id_column is not None:
                values = self.train_dataset[args.question_id_column]
                missing = [index for index, value in enumerate(values) if _is_missing_id(value)]
                if missing:
                    shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
                    logger.warning(
                        f"question_id_column={args.question_id_column!r} has no value (None, NaN or empty) in "
                        f"{len(missing)} of {len(values)} rows of the train dataset (rows {shown}). Each of them is "
                        "identified by a hash of its prompt instead, so that questions without an id are never merged "
                        "into one; fill the column to group them otherwise."
                    )
                    self._warned_missing_id = True
                dataset_ids = [
                    prompt_question_id(prompt) if _is_missing_id(value) else str(value)
                    for value, prompt in zip(values, prompts)
                ]
            else:
                dataset_ids = [prompt_question_id(p) for p in prompts]
            for index, question_id in enumerate(dataset_ids):
                self._question_index.setdefault(question_id, index)
            self._dataset_question_ids = list(self._question_index)

        self.replay_buffer = ReplayBuffer(
            num_generations=self.num_generations,
            bucket_center=args.bucket_center,
            bucket_width=args.bucket_width,
            max_trajectories_per_question=args.max_trajectories_per_question,
            max_buffer_trajectories=args.max_buffer_trajectories,
            question_selection=args.question_selection,
        )
        # Every process draws from this generator with the same seed and in the same order (TRL seeds torch per
        # process, so torch's generator cannot be shared).
        self._replay_rng = random.Random(args.seed)
        self._replay_plan: dict[int, Trajectory] | None = None
        self._pending_trajectories: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._last_global_rewards: torch.Tensor | None = None
        self._warned_all_retired = False
        # Displaced fresh questions waiting for a fresh slot (displaced_questions="requeue"), as (id, row JSON).
        self._requeued: deque[tuple[str, str]] = deque()
        # What has been trained on, for the replay metrics: replays per question, distinct fresh questions.
        self._replay_counts: Counter[str] = Counter()
        self._fresh_questions: set[str] = set()
        # Under FSDP and ZeRO-3 a forward pass is a collective: every process must run the same number of them.
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        self._collective_forward = bool(self.is_fsdp_enabled or zero3)
        self.add_callback(_MergeTrajectoriesCallback(self))

    # Question ids and planning ---------------------------------------------------------------------------------------

    def _row_question_id(self, row: dict) -> str:
        column = self.args.question_id_column
        if column is None:
            return prompt_question_id(row["prompt"])
        if column not in row:
            raise ValueError(
                f"question_id_column={column!r} is missing from the training rows (keys: {sorted(row)}); it must be "
                "a column of the train dataset, and remove_unused_columns must stay False."
            )
        value = row[column]
        if _is_missing_id(value):
            # The fallback the constructor announced for a map-style dataset; a stream is only seen row by row.
            if not self._warned_missing_id:
                logger.warning(
                    f"question_id_column={column!r} has no value (None, NaN or empty) in a training row (prompt "
                    f"{str(row['prompt'])[:200]!r}); such rows are identified by a hash of their prompt instead, so "
                    "that questions without an id are never merged into one."
                )
                self._warned_missing_id = True
            return prompt_question_id(row["prompt"])
        return str(value)

    def _replay_row(self, question_id: str) -> str:
        row = self.replay_buffer.encoded_row(question_id)
        if row is None and question_id in self._question_index:  # a replay state written before rows were kept
            row = encode_row(self.train_dataset[self._question_index[question_id]])
        if row is None:
            raise RuntimeError(f"The replay buffer holds no dataset row for question {question_id!r}.")
        return row

    def _plan_generation(self, inputs: list[dict]) -> tuple[list[dict], _GenerationPlan]:
        """Decide which groups are requeued, replaced (retired questions) or replayed, identically on every process.

        Works on the global list of groups (question id and dataset row of each, gathered from every process), then
        rebuilds this process's rows from it.
        """
        K = self.num_generations
        if len(inputs) % K != 0:
            raise RuntimeError(f"The local generation batch ({len(inputs)} rows) is not a whole number of groups.")
        num_local = len(inputs) // K
        local = []
        for g in range(num_local):
            ids = {self._row_question_id(row) for row in inputs[g * K : (g + 1) * K]}
            if len(ids) != 1:
                raise RuntimeError("A group of num_generations consecutive rows holds several questions.")
            local.append((ids.pop(), encode_row(inputs[g * K])))
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        groups = gather_object(local) if world > 1 else local  # [(question id, row JSON)] in global slot order
        num_groups = len(groups)
        buffer, rng, args = self.replay_buffer, self._replay_rng, self.args

        # Replayed questions take global slots j -> process j % world, that process's groups from the end.
        replay_slots: dict[int, str] = {}
        if buffer.replay_started and args.replay_ratio > 0:
            num_replay = min(math.floor(args.replay_ratio * num_groups + 1e-9), buffer.num_questions)
            drawn = buffer.sample_questions(num_replay, rng)
            for j, question_id in enumerate(drawn):
                replay_slots[(j % world) * num_local + num_local - 1 - j // world] = question_id
        random_choice = {}
        if args.trajectory_selection == "random":
            for slot in sorted(replay_slots):
                random_choice[slot] = rng.randrange(len(buffer.trajectories(replay_slots[slot])))

        fresh_slots = [slot for slot in range(num_groups) if slot not in replay_slots]
        if args.displaced_questions == "requeue":
            # The displaced questions wait for the next fresh slots: the fresh stream is delayed, never cut.
            candidates = [*self._requeued, *groups]
            if args.retire_solved_questions:
                candidates = [c for c in candidates if not buffer.is_retired(c[0])]
            fresh = dict(zip(fresh_slots, candidates))
            self._requeued = deque(candidates[len(fresh) :])
        else:  # "drop", as the paper's code: a displaced question is skipped for this epoch
            fresh = {slot: groups[slot] for slot in fresh_slots}

        # Retired questions leave the sampler: their groups get another, unretired question of the dataset.
        replaced = 0
        if args.retire_solved_questions and buffer.num_retired and self._dataset_question_ids is not None:
            pool = None
            for slot, (question_id, _) in list(fresh.items()):
                if not buffer.is_retired(question_id):
                    continue
                if pool is None:
                    pool = [q for q in self._dataset_question_ids if not buffer.is_retired(q)]
                if not pool:
                    if not self._warned_all_retired:
                        logger.warning("Every question of the dataset is retired; retired questions are trained on.")
                        self._warned_all_retired = True
                    break
                question_id = pool[rng.randrange(len(pool))]
                fresh[slot] = (question_id, encode_row(self.train_dataset[self._question_index[question_id]]))
                replaced += 1
        # A slot left empty (requeue ran out of candidates, which only retirement can cause) keeps its sampled group.
        planned = {slot: fresh.get(slot, groups[slot]) for slot in fresh_slots}
        planned.update({slot: (q, self._replay_row(q)) for slot, q in replay_slots.items()})
        planned = [planned[slot] for slot in range(num_groups)]

        inputs = list(inputs)
        local_replays = []  # (local group, question id)
        for g in range(num_local):
            slot = rank * num_local + g
            question_id, row = planned[slot]
            if row != local[g][1]:
                decoded = json.loads(row)
                inputs[g * K : (g + 1) * K] = [dict(decoded) for _ in range(K)]
            if slot in replay_slots:
                local_replays.append((g, question_id))

        plan = _GenerationPlan(
            group_question_ids=[q for q, _ in planned],
            group_rows=[row for _, row in planned],
            replayed_slots=sorted(replay_slots),
            num_replayed=len(replay_slots),
            num_replaced=replaced,
        )
        if args.trajectory_selection == "random":
            for g, question_id in local_replays:
                choice = random_choice[rank * num_local + g]
                plan.substitutions[g * K] = buffer.trajectories(question_id)[choice]
        else:
            # Scoring batches per process, known everywhere because the buffer and the plan are identical.
            batch_size = args.per_device_train_batch_size
            counts = [0] * world
            for slot, question_id in replay_slots.items():
                counts[slot // num_local] += len(buffer.trajectories(question_id))
            num_batches = max(math.ceil(c / batch_size) for c in counts) if self._collective_forward else None
            start = time.perf_counter()
            with profiling_context(self, "score_replay_entropy"):
                entropies = self._score_trajectories(
                    [(inputs[g * K]["prompt"], buffer.trajectories(q)) for g, q in local_replays], num_batches
                )
            if replay_slots:
                self._metrics["train"]["replay/entropy_scoring_time"].append(time.perf_counter() - start)
            for (g, question_id), scores in zip(local_replays, entropies):
                choice = select_trajectory(scores, args.trajectory_selection)
                plan.substitutions[g * K] = buffer.trajectories(question_id)[choice]
                plan.chosen_entropies.append(scores[choice])
        return inputs, plan

    @torch.no_grad()
    def _score_trajectories(
        self, candidates: list[tuple[object, list[Trajectory]]], num_batches: int | None
    ) -> list[list[float]]:
        """Mean per-token entropy under the current policy of each candidate trajectory, per question.

        The entropy is that of TRL's temperature-scaled distribution (the one its log-probs use), over the
        trajectory's tokens, EOS included. `candidates` holds (prompt, trajectories) per question. Runs in batches of `per_device_train_batch_size`;
        with `num_batches` set (collective forward passes), runs exactly that many, padding with dummy batches.
        """
        rows = [(q, t) for q, (_, trajectories) in enumerate(candidates) for t in trajectories]
        prompt_ids = self._tokenize_prompts([prompt for prompt, _ in candidates])[0] if candidates else []
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        batch_size = self.args.per_device_train_batch_size
        if num_batches is None:
            num_batches = math.ceil(len(rows) / batch_size)
        scores: list[list[float]] = [[] for _ in candidates]
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for b in range(num_batches):
                batch = rows[b * batch_size : (b + 1) * batch_size]
                if batch:
                    prompts = [torch.tensor(prompt_ids[q]) for q, _ in batch]
                    completions = [t.token_ids.long() for _, t in batch]
                else:  # a dummy batch, so that every process runs the same number of forward passes
                    prompts, completions = [torch.tensor([pad_id])], [torch.tensor([pad_id])]
                prompt = pad(prompts, padding_value=pad_id, padding_side="left")
                prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
                completion = pad(completions, padding_value=pad_id, padding_side="right")
                completion_mask = pad([torch.ones_like(c) for c in completions], padding_value=0, padding_side="right")
                _, entropies, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([prompt, completion], dim=1).to(device),
                    torch.cat([prompt_mask, completion_mask], dim=1).to(device),
                    completion.size(1),
                    batch_size=batch_size,
                    compute_entropy=True,
                )
                completion_mask = completion_mask.to(device)
                means = (entropies * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1)
                for (q, _), value in zip(batch, means.tolist()):
                    scores[q].append(value)
        return scores

    # Generation ------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # ±inf would turn the group mean, hence every advantage of the group, into NaN: such a reward is treated as
        # unscorable (as None), and a completion with no finite reward is left out of the loss.
        non_finite = torch.isinf(rewards_per_func)
        self._metrics["train" if self.model.training else "eval"]["rewards/non_finite"].append(
            non_finite.float().mean().item()
        )
        if non_finite.any():
            logger.warning(f"{int(non_finite.sum())} reward(s) were ±inf; they are treated as unscorable (like None).")
            rewards_per_func = rewards_per_func.masked_fill(non_finite, torch.nan)
        self._last_global_rewards = rewards_per_func  # (B_global, num_reward_funcs), gathered over processes
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if self._replay_plan:
            completion_ids = list(completion_ids)
            logprobs = list(logprobs) if logprobs is not None else None
            for row, trajectory in self._replay_plan.items():
                completion_ids[row] = trajectory.token_ids.tolist()
                if logprobs is not None:
                    logprobs[row] = trajectory.logps.tolist()
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            output = super()._generate_and_score_completions(inputs)
            output["scorable"] = self._scorable_rows()
            return output

        inputs, plan = self._plan_generation(inputs)
        K = self.num_generations
        num_rows = len(inputs)
        self._log_completion_extra("replayed", [row in plan.substitutions for row in range(num_rows)])
        self._replay_plan = plan.substitutions
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._replay_plan = None

        device = self.accelerator.device
        max_len = output["completion_ids"].size(1)
        num_local = num_rows // K
        rank = self.accelerator.process_index

        replay_mask = torch.zeros(num_rows, dtype=torch.bool, device=device)
        stored = torch.zeros(num_rows, max_len, dtype=torch.float32, device=device)
        for row, trajectory in plan.substitutions.items():
            replay_mask[row] = True
            stored[row, : trajectory.logps.numel()] = trajectory.logps.to(device)

        # Successes over all processes (the rewards TRL gathered), hence identical buffer updates everywhere.
        rewards_per_func = self._last_global_rewards
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        success = (rewards >= self.args.success_threshold) & scorable
        accuracy = success.sum().item() / success.numel()
        buffer = self.replay_buffer
        buffer.maybe_start_replay(accuracy, self.args.delayed_start_threshold)
        counts = success.view(-1, K).sum(dim=1).tolist()
        replays = self.args.replay_ratio > 0
        for question_id, row, count in zip(plan.group_question_ids, plan.group_rows, counts):
            # Without replay nothing is buffered (no bucket, row or trajectory would ever be read); retirement and
            # the phase still act (on the fresh sampler and on clipping), so they are still kept.
            if replays or count == K:
                buffer.record_group(question_id, count, row=row if buffer.needs_row(question_id) else None)
        for slot, question_id in enumerate(plan.group_question_ids):
            if slot in plan.replayed_slots:
                self._replay_counts[question_id] += 1
            else:
                self._fresh_questions.add(question_id)

        # Rows to store: the fresh correct rows of partially solved groups, once replay has started.
        collect = torch.zeros(num_rows, dtype=torch.bool, device=device)
        if buffer.replay_started and replays:
            local_success = success[rank * num_rows : (rank + 1) * num_rows]
            for g in range(num_local):
                if 0 < counts[rank * num_local + g] < K:
                    collect[g * K : (g + 1) * K] = local_success[g * K : (g + 1) * K]
            collect &= ~replay_mask

        output["replay_mask"] = replay_mask
        output["stored_per_token_logps"] = stored
        output["collect_mask"] = collect
        output["scorable"] = scorable[rank * num_rows : (rank + 1) * num_rows]
        output["question_ids"] = [plan.group_question_ids[rank * num_local + r // K] for r in range(num_rows)]
        if "importance_sampling_ratio" in output:
            # TRL compared the training policy with the stored log-probs we substituted as sampling log-probs; a
            # replayed row was not sampled by vLLM, so it gets no vLLM correction.
            output["importance_sampling_ratio"][replay_mask] = 1.0

        self._log_generation_metrics(plan, accuracy, success.numel(), rewards)
        return output

    def _scorable_rows(self) -> torch.Tensor:
        rewards_per_func = self._last_global_rewards
        num_local = rewards_per_func.size(0) // self.accelerator.num_processes
        start = self.accelerator.process_index * num_local
        return ~torch.isnan(rewards_per_func[start : start + num_local]).all(dim=1)

    def _log_generation_metrics(self, plan: _GenerationPlan, accuracy: float, num_rows: int, rewards) -> None:
        buffer, metrics, K = self.replay_buffer, self._metrics["train"], self.num_generations
        metrics["replay/phase"].append(float(buffer.replay_started))
        metrics["replay/accuracy"].append(accuracy)
        metrics["replay/replaced_retired_questions"].append(plan.num_replaced)
        metrics["replay/distinct_fresh_questions"].append(len(self._fresh_questions))
        if self.args.replay_ratio == 0:  # the rest describes a buffer and replays that do not exist
            return
        metrics["replay/replayed_questions_fraction"].append(plan.num_replayed / len(plan.group_question_ids))
        metrics["replay/replayed_rows_fraction"].append(plan.num_replayed / num_rows)
        metrics["replay/requeued_questions"].append(len(self._requeued))
        metrics["replay/distinct_replayed_questions"].append(len(self._replay_counts))
        metrics["replay/max_replays_per_question"].append(max(self._replay_counts.values(), default=0))
        for k, size in buffer.bucket_sizes().items():
            metrics[f"replay/bucket_{k}_questions"].append(size)
        if plan.replayed_slots:
            # The replayed row of a group is its first row (global row = slot * K).
            replayed_rewards = rewards[[slot * K for slot in plan.replayed_slots]]
            metrics["replay/replayed_reward_mean"].append(replayed_rewards.mean().item())
        if self.args.trajectory_selection != "random":
            device = self.accelerator.device
            # An explicit dtype: a process that replayed nothing would otherwise send int64 zeros against the others'
            # float32, and the reduce aborts (gloo) or hangs. Every collective here has a rank-independent dtype/shape.
            local = torch.tensor(
                [sum(plan.chosen_entropies), len(plan.chosen_entropies)], dtype=torch.float32, device=device
            )
            total, count = self.accelerator.reduce(local, reduction="sum").tolist()
            if count > 0:
                metrics["replay/chosen_entropy"].append(total / count)

    # Collection ------------------------------------------------------------------------------------------------------

    def _collect_trajectories(self, inputs, per_token_logps: torch.Tensor) -> None:
        collect = inputs.get("collect_mask")
        if collect is None or not collect.any():
            return
        # The sampling policy's log-probs: TRL's old_per_token_logps when it computed them; otherwise the policy has
        # not stepped since generation and this first pass over the rows computes exactly them.
        source = inputs.get("old_per_token_logps")
        source = per_token_logps.detach() if source is None else source
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"].bool()
        for row in collect.nonzero().flatten().tolist():
            mask = completion_mask[row]
            if mask.any():
                self._pending_trajectories.append(
                    (inputs["question_ids"][row], completion_ids[row][mask].cpu(), source[row][mask].float().cpu())
                )
        # With num_iterations > 1 the same rows come back; they are stored once.
        inputs["collect_mask"] = torch.zeros_like(collect)

    def _merge_pending_trajectories(self) -> None:
        metrics = self._metrics["train"]
        metrics["replay/retired_questions"].append(self.replay_buffer.num_retired)
        if self.args.replay_ratio == 0:  # nothing is collected (the same on every process: no gather needed)
            return
        pending, self._pending_trajectories = self._pending_trajectories, []
        if self.accelerator.num_processes > 1:
            pending = gather_object(pending)  # every process's list, in process order
        for question_id, token_ids, logps in pending:
            self.replay_buffer.add_trajectory(question_id, token_ids, logps)
        metrics["replay/buffer_questions"].append(self.replay_buffer.num_questions)
        metrics["replay/buffer_trajectories"].append(self.replay_buffer.num_trajectories)

    # Loss ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask
        if "scorable" in inputs:  # a completion no reward function could score is not trained on
            mask = mask * inputs["scorable"].unsqueeze(1).to(mask.dtype)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._collect_trajectories(inputs, per_token_logps)

        num_rows = per_token_logps.size(0)
        replay_mask = inputs.get("replay_mask")
        if replay_mask is None:  # evaluation batches are all fresh
            replay_mask = torch.zeros(num_rows, dtype=torch.bool, device=per_token_logps.device)
        stored = inputs.get("stored_per_token_logps")
        stored = torch.zeros_like(per_token_logps) if stored is None else stored
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        if not self.args.replay_importance_correction:
            # The ablation: replayed tokens are weighed against the policy that started this step, as if on-policy.
            stored = torch.where(replay_mask.unsqueeze(1), old_per_token_logps, stored)
        clip_fresh = not (self.args.unclip_fresh_after_switch and self.replay_buffer.replay_started)

        per_token_loss, ratio, shaped_weight, per_token_kl = exgrpo_per_token_loss(
            per_token_logps,
            old_per_token_logps,
            stored,
            inputs["advantages"],
            replay_mask,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            clip_fresh=clip_fresh,
            shaping=self.args.replay_weight_shaping if self.args.replay_policy_shaping else None,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio")
            if self.use_vllm and self.vllm_importance_sampling_correction
            else None,
            ref_per_token_logps=inputs.get("ref_per_token_logps"),
            beta=self.beta,
            kl_bias_correction=self.args.use_bias_correction_kl,
        )

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = aggregate_loss(per_token_loss, mask, "dapo", num_items=num_items)
        else:
            loss = aggregate_loss(per_token_loss, mask, self.loss_type, self.max_completion_length) / accumulation

        if self._entropy_bonus_enabled:  # static coefficient only (adaptive control is refused by the config)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(loss.detach()).nanmean().item())
            entropy_loss = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * entropy_loss
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # Metrics
        def global_masked_mean(x, m):  # None when no process has a token under the mask
            totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum().float()]), reduction="sum")
            return totals[0].item() / totals[1].item() if totals[1].item() > 0 else None

        def append(name, value):
            if value is not None:
                self._metrics[mode][name].append(value)

        if self.beta != 0.0:
            append("kl", global_masked_mean(per_token_kl, mask))
        append("entropy", global_masked_mean(entropies, mask))

        # Clipping statistics of fresh tokens (after the switch with unclip_fresh_after_switch, they count the tokens
        # outside the clip range, which are then not clipped).
        fresh_mask = mask * (~replay_mask).unsqueeze(1)
        advantages = inputs["advantages"].unsqueeze(1)
        is_low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        is_high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        append("clip_ratio/low_mean", global_masked_mean(is_low, fresh_mask))
        append("clip_ratio/high_mean", global_masked_mean(is_high, fresh_mask))
        append("clip_ratio/region_mean", global_masked_mean(torch.maximum(is_low, is_high), fresh_mask))
        row_tokens = fresh_mask.sum(-1)
        low_rows = torch.where(row_tokens > 0, (is_low * fresh_mask).sum(-1) / row_tokens.clamp(min=1), torch.nan)
        high_rows = torch.where(row_tokens > 0, (is_high * fresh_mask).sum(-1) / row_tokens.clamp(min=1), torch.nan)
        low_min = nanmin(self.accelerator.gather(low_rows)).item()
        high_max = nanmax(self.accelerator.gather(high_rows)).item()
        if not math.isnan(low_min):
            append("clip_ratio/low_min", low_min)
            append("clip_ratio/high_max", high_max)
        if self.args.replay_ratio == 0:
            return loss
        append("replay/shaped_weight_mean", global_masked_mean(shaped_weight, mask * replay_mask.unsqueeze(1)))
        # The replayed rows' share of the policy loss, in absolute per-token loss: how much of the update they drive.
        magnitude = (per_token_loss.detach().abs() * mask).sum(-1)
        totals = self.accelerator.reduce(torch.stack([magnitude[replay_mask].sum(), magnitude.sum()]), reduction="sum")
        if totals[1].item() > 0:
            append("replay/loss_share", totals[0].item() / totals[1].item())
        return loss

    # Checkpoints -----------------------------------------------------------------------------------------------------
    # The replay state is written with the optimizer state, i.e. inside the checkpoint before it is pushed or older
    # ones rotated, and read on one process and broadcast, so every process resumes the same buffer.

    def _replay_state_dict(self) -> dict:
        version, internal, gauss_next = self._replay_rng.getstate()
        return {
            "format": 2,
            "question_id_column": self.args.question_id_column,
            "buffer": self.replay_buffer.state_dict(),
            "rng": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "requeued": [list(item) for item in self._requeued],
            "replay_counts": dict(self._replay_counts),
            "fresh_questions": sorted(self._fresh_questions),
        }

    def _load_replay_state_dict(self, state: dict) -> None:
        self.replay_buffer.load_state_dict(state["buffer"])
        rng = state["rng"]
        self._replay_rng.setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))
        self._requeued = deque(tuple(item) for item in state.get("requeued", []))
        self._replay_counts = Counter(state.get("replay_counts", {}))
        self._fresh_questions = set(state.get("fresh_questions", []))

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            path = os.path.join(output_dir, REPLAY_STATE_NAME)
            torch.save(self._replay_state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)  # a kill mid-write never leaves a truncated file under the real name

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, REPLAY_STATE_NAME)
        # The main process alone looks at the file (the others may not share its file system) and every process acts
        # on its verdict, so all of them take the same branch and join the same broadcast.
        message = [self._read_replay_state(checkpoint, path) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(message, from_process=0)
        verdict, payload = message[0]
        if verdict == "missing":
            raise FileNotFoundError(payload)
        if verdict == "unreadable":
            raise ValueError(payload)
        if verdict == "absent":
            logger.warning(payload)
            return
        state = payload
        self._check_replay_state(path, state)
        self._load_replay_state_dict(state)
        dropped = self.replay_buffer.drop_longer_than(self.max_completion_length)
        if dropped:
            logger.warning(
                f"Dropped {dropped} stored trajectories longer than max_completion_length={self.max_completion_length} "
                f"from the replay state in {path}: this run could not have generated them."
            )

    def _read_replay_state(self, checkpoint: str, path: str) -> tuple[str, object]:
        """On the main process: ("state", the state), or a verdict and its message ("missing", "unreadable", "absent":
        a checkpoint ExGRPO did not write)."""
        if not os.path.isfile(path):
            if _written_with(checkpoint, type(self.args).__name__):
                return "missing", (
                    f"{checkpoint} was written by ExGRPOTrainer but has no {REPLAY_STATE_NAME} (the replay buffer): "
                    "the save was interrupted or the file was removed. Resume from an earlier, complete checkpoint."
                )
            return "absent", (
                f"No {REPLAY_STATE_NAME} in {checkpoint}: resuming ExGRPO with an empty replay buffer. This is expected "
                "only for a checkpoint that ExGRPOTrainer did not write (a GRPO checkpoint, say)."
            )
        try:
            state = torch.load(path, weights_only=True)
            if not isinstance(state, dict) or "buffer" not in state:
                raise ValueError("not an ExGRPO replay state")
        except Exception as error:
            return "unreadable", (
                f"{path} is corrupt or truncated and cannot be read ({type(error).__name__}: {error}). Resume from an "
                "earlier checkpoint."
            )
        return "state", state

    def _check_replay_state(self, path: str, state: dict) -> None:
        """The replay state must be whole and consistent, and come from a run on the same questions: same id column,
        same dataset."""
        try:
            _check_replay_state_entries(state, self.model.get_input_embeddings().num_embeddings)
        except ValueError as error:
            raise ValueError(
                f"Cannot resume from {path}: {error}. The file was edited or damaged after it was written; resume from "
                "an earlier checkpoint, or remove the file to resume with an empty replay buffer."
            ) from None
        saved_column = state.get("question_id_column", self.args.question_id_column)  # format 1 did not record it
        if saved_column != self.args.question_id_column:
            raise ValueError(
                f"Cannot resume from {path}: its questions are identified by question_id_column={saved_column!r}, this "
                f"run uses {self.args.question_id_column!r}. Resume with question_id_column={saved_column!r}."
            )
        if self._dataset_question_ids is None:  # an iterable dataset: its questions cannot be listed
            return
        saved = set(state["buffer"]["question_ids"]) | set(state["buffer"]["retired"])
        unknown = saved - set(self._question_index)
        if unknown:
            raise ValueError(
                f"Cannot resume from {path}: {len(unknown)} of the {len(saved)} questions in its replay state are not "
                f"in this train dataset (e.g. {sorted(unknown)[0]!r}). It was written for another dataset, or with "
                "other prompts; resume with the dataset it was trained on."
            )


def _check_replay_state_entries(state: dict, vocab_size: int) -> None:
    """Raise a ValueError saying what is wrong with a replay state read from disk (written by `_replay_state_dict`)."""
    if state.get("format", 1) not in (1, 2):
        raise ValueError(f"it has format {state.get('format')!r}, this version reads formats 1 and 2")
    ReplayBuffer.check_state_dict(state["buffer"])
    token_ids = state["buffer"]["token_ids"]
    if token_ids.numel() and int(token_ids.max()) >= vocab_size:
        raise ValueError(f"a stored token id ({int(token_ids.max())}) is outside the model's {vocab_size} embeddings")
    if "rng" not in state:
        raise ValueError("it has no 'rng' entry (the state of the generator that draws replayed questions)")
    rng = state["rng"]
    try:
        random.Random().setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"its 'rng' entry is not the state of a random.Random ({type(error).__name__}: {error})"
        ) from None
    requeued = state.get("requeued", [])
    if not isinstance(requeued, list) or not all(
        isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)
        for item in requeued
    ):
        raise ValueError("its 'requeued' entry is not a list of (question id, dataset row) pairs of strings")
    counts = state.get("replay_counts", {})
    if not isinstance(counts, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items()):
        raise ValueError("its 'replay_counts' entry is not a dict of question id -> replays")
    fresh = state.get("fresh_questions", [])
    if not isinstance(fresh, list) or not all(isinstance(q, str) for q in fresh):
        raise ValueError("its 'fresh_questions' entry is not a list of question ids")


def _is_missing_id(value) -> bool:
    """Whether a question_id_column value is missing: str() would make every such row one question ("None", "nan")."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _written_with(checkpoint: str, config_class: str) -> bool:
    """Whether the training arguments saved in a checkpoint are of class `config_class` (read, never unpickled)."""
    try:
        with zipfile.ZipFile(os.path.join(checkpoint, TRAINING_ARGS_NAME)) as archive:
            pickles = [archive.read(name) for name in archive.namelist() if name.endswith("data.pkl")]
    except (OSError, zipfile.BadZipFile):
        return False
    # the pickle names the class as "module\nClassName" (GLOBAL opcode)
    return any(f"\n{config_class}\n".encode() in data for data in pickles)
