import inspect
import logging
import math
import os
import pickletools
import random
import textwrap
import zipfile
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model
from transformers import get_scheduler
from transformers.trainer import TRAINING_ARGS_NAME
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, pad

from .flowrl_config import FlowRLConfig
from .log_z import LogZHead, pool_prompt
from .objective import _MAX_LOG_WEIGHT, _log_ratio_term, group_log_z, trajectory_balance_terms
from .replay import RolloutBuffer, token_digest


logger = logging.getLogger(__name__)

# Written into each checkpoint folder, beside the policy's optimizer state.
LOG_Z_STATE_NAME = "flowrl_log_z.pt"
_STATE_FORMAT = 3  # 3: the replay buffer and its generator
# Settings a checkpoint must have been trained with to be resumed: they define the target or the head's architecture.
_RESUME_SETTINGS = (
    "beta",
    "residual_normalization",
    "reward_in_residual",
    "log_z_estimate",
    "log_z_num_layers",
    "log_z_pooling",
)
# The keys of the generation output that the loss passes on to the policy's forward pass (multimodal inputs).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# The keys of TRL's generation output that replay extends with the replayed rows (any other per-row key is refused).
_REPLAY_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "num_items_in_batch",
    "old_per_token_logps",
    "importance_sampling_ratio",
    "sampling_per_token_logps",
    "ref_per_token_logps",
    "rewards",
)


def saved_config_class(checkpoint: str) -> str | None:
    """The class name of the training arguments a checkpoint was written with (`FlowRLConfig`, `GRPOConfig`, ...).

    Read from the opcodes of the pickle in `training_args.bin`, without unpickling it; None when it cannot be read.
    """
    try:
        with zipfile.ZipFile(os.path.join(checkpoint, TRAINING_ARGS_NAME)) as archive:
            data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":  # the first global of the pickle is the class of the pickled object
                return str(arg).split(" ")[-1]
            if opcode.name == "STACK_GLOBAL":
                return None
    except (OSError, KeyError, StopIteration, ValueError, zipfile.BadZipFile):
        return None
    return None


def _read_state(path: str) -> dict | str:
    """FlowRL's state from `path`, its tensors on the CPU, or a message saying why it cannot be used.

    "Corrupt" is said only of a file whose archive fails its checks (truncated, or damaged bytes): a complete file that
    cannot be loaded, or holds something else, is described as such.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # reads every member and checks its CRC
        damaged = None if bad_member is None else f"{bad_member} fails its CRC check"
    except OSError as error:  # the file system refused: not a property of the file
        return f"{path} cannot be read ({type(error).__name__}: {error}). Check the path and its permissions."
    except Exception as error:  # any failure to unzip; caught so that no rank is left waiting for the broadcast
        damaged = f"not a readable archive: {type(error).__name__}: {error}"
    if damaged is not None:
        return (
            f"{path} is corrupt or truncated ({damaged}): the save that wrote it did not complete, or the file was "
            "damaged since. Resume from an earlier checkpoint."
        )
    try:
        # On the CPU whatever the writing run's device: the head is copied onto this run's device when it is loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        return (
            f"{path} is complete but could not be loaded with torch {torch.__version__} ({type(error).__name__}: "
            f"{error}). It was not written by FlowRLTrainer's torch.save of plain tensors and numbers, or by a torch "
            "this one cannot read: resume with the torch version that wrote it."
        )
    if not isinstance(state, dict) or "head" not in state or "optimizer" not in state:
        return (
            f"{path} is complete but is not a FlowRL state (a {type(state).__name__} without the 'head' and "
            f"'optimizer' entries): the file was replaced. Put back the {LOG_Z_STATE_NAME} that FlowRLTrainer wrote "
            "into this checkpoint, or resume from an earlier checkpoint."
        )
    return state


class FlowRLTrainer(GRPOTrainer):
    """
    Trainer for FlowRL: matching the reward distribution instead of maximising the reward.

    FlowRL (https://huggingface.co/papers/2509.15207) trains the policy toward `p*(y|x) ∝ π_ref(y|x) · exp(β · r(x,y))`
    with a trajectory-balance loss and a learnable log-partition head, which keeps rare but valid reasoning paths alive
    where reward maximisation collapses onto the dominant one. It takes every argument of [`~trl.GRPOTrainer`]
    (model path or instance, reward functions and models, PEFT config, callbacks, vLLM settings) with a
    [`FlowRLConfig`]; only the objective changes.

    With the default `objective="official"` the loss is the official code's, which in practice behaves like GRPO with
    a weak pull toward the reference on multi-token completions (see [`FlowRLConfig`]); `objective="matching"` (a
    departure from the paper) is the objective whose fixed point is the target distribution.

    What differs from GRPOTrainer, and where:
    - `_compute_loss`: the trajectory-balance loss (`trajectory_balance_terms`) replaces GRPO's clipped surrogate. No KL
      term is added; `beta` is the reward scale, and being positive it makes TRL compute reference log-probs.
    - With `log_z_estimate="head"`, the log Z head reads the policy's final hidden states over the prompt, captured by
      a forward hook during the same training forward pass (no second pass). It is a module of its own with its own
      AdamW and scheduler, stepped after each gradient accumulation window with its gradients averaged over
      processes, so it is identical on every rank, absent from the saved policy and from the vLLM weight sync, and
      saved in every checkpoint (`flowrl_log_z.pt`, written with the optimizer state, before the checkpoint is pushed
      or older ones rotated). With `log_z_estimate="group"` there is no head: log Z is each group's own estimate.
    - `_calculate_rewards` / `_generate_and_score_completions`: keep the raw rewards, for `reward_in_residual="reward"`
      and to leave unscorable completions (every reward function returned None) out of the loss; number the groups
      for the group estimate.
    """

    _tag_names = ["trl", "flowrl"]
    _name = "FlowRL"
    _paper = {
        "title": "FlowRL: Matching Reward Distributions for LLM Reasoning",
        "id": "2509.15207",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhu2025flowrl,
                title        = {{FlowRL: Matching Reward Distributions for LLM Reasoning}},
                author       = {Xuekai Zhu and Daixuan Cheng and Dinghuai Zhang and Hengli Li and Kaiyan Zhang and Che Jiang and Youbang Sun and Ermo Hua and Yuxin Zuo and Xingtai Lv and Qizheng Zhang and Lin Chen and Fanghao Shao and Bo Xue and Yunchong Song and Zhenjie Yang and Ganqu Cui and Ning Ding and Jianfeng Gao and Xiaodong Liu and Bowen Zhou and Hongyuan Mei and Zhouhan Lin},
                booktitle    = {International Conference on Learning Representations},
                year         = 2026,
                eprint       = {arXiv:2509.15207},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: FlowRLConfig | None = None, *more_args, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = FlowRLConfig(f"{model_name.split('/')[-1]}-FlowRL")
        elif not isinstance(args, FlowRLConfig):
            raise TypeError(
                f"FlowRLTrainer needs a FlowRLConfig, got {type(args).__name__}. Replace GRPOConfig(...) with "
                "FlowRLConfig(...): it takes the same arguments, plus FlowRL's own (beta is the reward scale, 15 by "
                "default)."
            )
        # The residual needs reference log-probs. TRL rebuilds the reference from the model's name_or_path unless a
        # PEFT adapter can be disabled instead, which fails obscurely for an in-memory model with no path.
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, model, reward_funcs, args, *more_args, **kwargs)
        if (
            not isinstance(model, str)
            and not is_peft_model(model)
            and bound.arguments.get("peft_config") is None
            and not get_config_model_id(model.config)
        ):
            raise ValueError(
                "FlowRL needs reference log-probs, and TRL builds the reference model from the policy's name_or_path, "
                "which this model instance does not have. Pass the model as a hub id or a local path (save it first "
                "with model.save_pretrained(dir)), or pass a peft_config so the reference is the adapter-free model."
            )
        if args.replay_share > 0:
            for name in ("tools", "rollout_func", "environment_factory"):
                if bound.arguments.get(name) or kwargs.get(name):
                    raise ValueError(
                        f"FlowRL's replay (replay_share > 0) does not support `{name}`: a stored completion cannot "
                        "re-enter TRL's multi-turn loop (tool outputs, environment state). Set replay_share=0."
                    )
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)

        self.replay_buffer = None
        if args.replay_share > 0:
            if self._is_vlm:
                raise ValueError(
                    "FlowRL's replay (replay_share > 0) does not support vision-language models: the store keeps token "
                    "ids, not images. Set replay_share=0."
                )
            self.replay_buffer = RolloutBuffer(
                args.replay_buffer_per_prompt,
                args.replay_buffer_max_rows,
                keep_behaviour_logps=args.replay_importance_weight == "clipped",
            )
            # Every process draws from this generator with the same seed and in the same order (TRL seeds torch per
            # process, so torch's generator cannot be shared).
            self._replay_rng = random.Random(args.seed)

        self.log_z_head = self.log_z_optimizer = self.log_z_scheduler = None
        if args.log_z_estimate == "head":
            hidden_size = self.model.config.get_text_config().hidden_size
            dropout = 0.0 if args.disable_dropout else args.log_z_dropout
            # Seeded on its own so that every rank builds the same head without disturbing the global RNG streams.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                head = LogZHead(hidden_size, num_layers=args.log_z_num_layers, dropout=dropout)
            self.log_z_head = head.to(self.accelerator.device)
            self.log_z_optimizer = torch.optim.AdamW(
                self.log_z_head.parameters(),
                lr=self._log_z_learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
            # log_z_scheduler is built with the policy's scheduler, once the number of steps is known
        self._last_rewards_per_func = None

    @property
    def _log_z_learning_rate(self) -> float:
        lr = self.args.log_z_learning_rate
        return lr if lr is not None else self.args.learning_rate

    # ----------------------------------------------------------------------------------------------------------------
    # The head's optimisation: its own optimizer, stepped at the end of every gradient accumulation window.

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.log_z_head is None:
            return scheduler
        self.log_z_scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=self.log_z_optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        return scheduler

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.log_z_head is not None and self.accelerator.sync_gradients:
            self._log_z_optimizer_step()
        return loss

    def _log_z_optimizer_step(self):
        params = list(self.log_z_head.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        # The head is not wrapped by DDP/FSDP/DeepSpeed, so its gradients are averaged here, as DDP would.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        if self.accelerator.scaler is not None:  # fp16: the loss was scaled before backward
            flat /= self.accelerator.scaler.get_scale()
        if not torch.isfinite(flat).all():
            logger.warning("Skipping the log Z head's optimizer step: its gradients are not finite.")
            self.log_z_optimizer.zero_grad(set_to_none=True)
            return
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        self.log_z_optimizer.step()
        if self.log_z_scheduler is not None:
            self.log_z_scheduler.step()
        self.log_z_optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------------------------------------------
    # Raw rewards: TRL keeps only the advantages in its output, so the gathered rewards are stashed on the way.

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # ±inf would make every residual of its group infinite: such a reward is treated as unscorable (as None).
        non_finite = torch.isinf(rewards_per_func)
        self._metrics["train" if self.model.training else "eval"]["rewards/non_finite"].append(
            non_finite.float().mean().item()
        )
        if non_finite.any():
            logger.warning(f"{int(non_finite.sum())} reward(s) were ±inf; they are treated as unscorable (like None).")
            rewards_per_func = rewards_per_func.masked_fill(non_finite, torch.nan)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self.args.log_z_estimate == "group" and not self.model.training:
            # The config checks the evaluation batch only when evaluation is scheduled (do_eval); a direct
            # trainer.evaluate() gets here unchecked, and a batch of partial groups would be grouped wrongly in silence.
            self._check_whole_eval_groups(len(inputs))
        replayed = None
        if self.replay_buffer is not None and self.model.training:
            inputs, replayed = self._plan_replay(inputs)
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._last_rewards_per_func  # (B_global, num_reward_funcs), gathered over processes
        local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * local
        rewards_per_func = rewards_per_func[start : start + local]
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        # A completion that no reward function could score carries no signal: NaN keeps it out of the loss.
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        output["rewards"] = rewards
        if replayed is not None:
            self._store_rollouts(output)
            if replayed:
                output = self._append_replayed(output, replayed)
                local = output["prompt_ids"].size(0)
            else:
                self._metrics["train"]["flowrl/replay/share"].append(0.0)
        if self.args.log_z_estimate == "group":
            # TRL's output holds whole groups of consecutive rows on each process (checked by the config); evaluation
            # samples num_generations_eval completions per prompt.
            group_size = self.num_generations if self.model.training else self.num_generations_eval
            group = torch.arange(local, device=output["rewards"].device) // group_size
            output["flowrl_group"] = group
            if self.model.training and self.args.steps_per_generation > 1:
                # The loss will see parts of groups: estimate log Z now, from the sampling policy's log-probs.
                output["flowrl_log_z"] = self._group_log_z_at_generation(output, group)
        return output

    def _check_whole_eval_groups(self, local_rows: int) -> None:
        group_size = self.num_generations_eval
        if local_rows % group_size != 0:
            raise ValueError(
                f"log_z_estimate='group' estimates log Z from each prompt's completions on its own process, but this "
                f"evaluation batch holds {local_rows} completions on this process, not a multiple of the "
                f"{group_size} completions per prompt (num_generations_eval, or num_generations when unset). Set "
                f"per_device_eval_batch_size to a multiple of {group_size}, or num_generations_eval to a divisor of "
                f"per_device_eval_batch_size ({self.args.per_device_eval_batch_size})."
            )

    @torch.no_grad()
    def _group_log_z_at_generation(self, output, group):
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        logps = output.get("old_per_token_logps")
        if logps is None:  # TRL did not need them: one no-grad pass of the policy, as TRL's own would be
            logps = self._policy_logps(output)
        terms = self._reward_term(output)
        included = (mask.sum(-1) > 0) & ~torch.isnan(output["rewards"])
        gap = _log_ratio_term(logps, output["ref_per_token_logps"], mask.float(), self.args.residual_normalization)
        return group_log_z(gap, torch.nan_to_num(terms), self.args.beta, group, included)

    @torch.no_grad()
    def _policy_logps(self, output):
        """(B, T) log-probs of the current policy for the completions of a generation output (no gradient)."""
        prompt_completion_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        forward_kwargs = {key: output[key] for key in _FORWARD_KEYS if output.get(key) is not None}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                prompt_completion_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
                **forward_kwargs,
            )
        return logps

    # ----------------------------------------------------------------------------------------------------------------
    # Replay of past rollouts (replay_share > 0): the store is fed and drawn from identically on every process.

    def _plan_replay(self, inputs):
        """The fresh rows to generate and this process's replayed groups, drawn before this batch is stored.

        Every process replays the same number of groups (TRL gathers equal-sized tensors across processes): the share
        of this process's groups, rounded up or down at random, at most the eligible prompts per process, and never
        all of its groups (TRL's generation step needs prompts). Replayed
        group j goes to process j % world; the fresh groups it displaces (the last ones of each process) are skipped.
        """
        K = self.num_generations
        num_local = len(inputs) // K
        world = self.accelerator.num_processes
        wanted = self.args.replay_share * num_local
        per_process = math.floor(wanted) + (self._replay_rng.random() < wanted - math.floor(wanted))
        # At least one group per process stays fresh: TRL's generation step needs prompts to generate for.
        per_process = min(per_process, num_local - 1, len(self.replay_buffer.eligible_prompts(K)) // world)
        if per_process == 0:
            return inputs, []
        groups = self.replay_buffer.draw_groups(
            per_process * world, K, self._replay_rng, self.args.replay_sampling, self.args.replay_temperature
        )
        return inputs[: (num_local - per_process) * K], groups[self.accelerator.process_index :: world]

    def _store_rollouts(self, output) -> None:
        """Add this batch's scored fresh completions of every process to the store, in process order."""
        mask = output["completion_mask"].bool()
        keep = mask.any(dim=1) & ~torch.isnan(output["rewards"])
        behaviour = None
        if self.replay_buffer.keep_behaviour_logps:
            # The trainer's log-probs at generation, as a fresh row's weight uses (vLLM's own, with their NaN for the
            # tokens it could not score, enter only TRL's separate correction, which replayed rows do not get).
            behaviour = output.get("old_per_token_logps")
            behaviour = self._policy_logps(output) if behaviour is None else behaviour
        rows = []
        for i in keep.nonzero().flatten().tolist():
            prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].cpu()
            rows.append(
                (
                    prompt,
                    output["completion_ids"][i][mask[i]].cpu(),
                    output["ref_per_token_logps"][i][mask[i]].float().cpu(),
                    None if behaviour is None else behaviour[i][mask[i]].float().cpu(),
                    float(output["rewards"][i]),
                )
            )
        if self.accelerator.num_processes > 1:
            rows = gather_object(rows)
        step = self.state.global_step
        added = 0
        for prompt, completion, ref, behaviour_logps, reward in rows:
            added += self.replay_buffer.add(
                token_digest(prompt), prompt, completion, ref, reward, step, behaviour_logps
            )
        metrics = self._metrics["train"]
        metrics["flowrl/replay/stored"].append(added)
        metrics["flowrl/replay/buffer_rows"].append(self.replay_buffer.num_rows)
        metrics["flowrl/replay/buffer_prompts"].append(self.replay_buffer.num_prompts)

    def _append_replayed(self, output, groups):
        """TRL's output for the fresh rows, followed by this process's replayed groups (padded alike)."""
        unknown = [
            key
            for key, value in output.items()
            if key not in _REPLAY_KEYS and isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        if unknown:
            raise RuntimeError(
                f"FlowRL's replay does not know how to add replayed rows to these keys of TRL's generation output: "
                f"{unknown}. This TRL version or option adds per-row data that a stored completion lacks; set "
                "replay_share=0."
            )
        device = output["prompt_ids"].device
        rows = [(prompt_ids, stored) for _, prompt_ids, picked in groups for stored in picked]
        pad_id = self._tokenizer.pad_token_id
        prompts = [p.long().to(device) for p, _ in rows]
        completions = [r.completion_ids.long().to(device) for _, r in rows]
        replay = {
            "prompt_ids": pad(prompts, padding_value=pad_id, padding_side="left"),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left"),
            "completion_ids": pad(completions, padding_value=pad_id, padding_side="right"),
            "completion_mask": pad([torch.ones_like(c) for c in completions], padding_value=0, padding_side="right"),
            "ref_per_token_logps": pad([r.ref_logps.to(device) for _, r in rows], padding_value=0.0),
            "rewards": torch.tensor([r.reward for _, r in rows], dtype=output["rewards"].dtype, device=device),
        }
        # Unused by the matching residual (it takes the raw reward): the group-centred reward, for TRL's key.
        rewards = replay["rewards"].view(-1, self.num_generations)
        replay["advantages"] = (rewards - rewards.mean(dim=1, keepdim=True)).flatten().to(output["advantages"].dtype)

        fresh = output["prompt_ids"].size(0)
        multiple = self.pad_to_multiple_of or 1  # TRL's padding guarantee, kept for the combined batch
        width = math.ceil(max(output["prompt_ids"].size(1), replay["prompt_ids"].size(1)) / multiple) * multiple
        length = (
            math.ceil(max(output["completion_ids"].size(1), replay["completion_ids"].size(1)) / multiple) * multiple
        )

        def left(x, value):
            return torch.nn.functional.pad(x, (width - x.size(1), 0), value=value)

        def right(x, value):
            return torch.nn.functional.pad(x, (0, length - x.size(1)), value=value)

        combined = dict(output)
        combined["prompt_ids"] = torch.cat([left(output["prompt_ids"], pad_id), left(replay["prompt_ids"], pad_id)])
        combined["prompt_mask"] = torch.cat([left(output["prompt_mask"], 0), left(replay["prompt_mask"], 0)])
        for key, value in (("completion_ids", pad_id), ("completion_mask", 0), ("ref_per_token_logps", 0.0)):
            combined[key] = torch.cat([right(output[key], value), right(replay[key], value)])
        for key in ("rewards", "advantages"):
            combined[key] = torch.cat([output[key], replay[key]])
        replayed_rows = combined["completion_ids"][fresh:]
        if any(key in output for key in ("old_per_token_logps", "sampling_per_token_logps")):
            # The replayed rows' log-probs under the policy of this generation batch: what TRL's fresh rows get.
            view = {key: combined[key][fresh:] for key in ("prompt_ids", "prompt_mask", "completion_mask")}
            current = self._policy_logps({**view, "completion_ids": replayed_rows})
            for key in ("old_per_token_logps", "sampling_per_token_logps"):
                if key in output:
                    combined[key] = torch.cat([right(output[key], 0.0), current.to(output[key].dtype)])
        if "importance_sampling_ratio" in output:  # vLLM did not sample the replayed rows: no vLLM correction
            ratio = output["importance_sampling_ratio"]
            if ratio.dim() == 2 and ratio.size(1) > 1:
                ratio = right(ratio, 1.0)
            combined["importance_sampling_ratio"] = torch.cat(
                [ratio, torch.ones(len(rows), *ratio.shape[1:], dtype=ratio.dtype, device=device)]
            )
        replayed_tokens = replay["completion_mask"].sum()
        combined["num_items_in_batch"] = output["num_items_in_batch"] + self.accelerator.gather(replayed_tokens).sum()
        combined["flowrl_replayed"] = torch.arange(fresh + len(rows), device=device) >= fresh
        steps = [self.state.global_step - r.step for _, r in rows]
        combined["flowrl_replay_age"] = torch.tensor([0] * fresh + steps, dtype=torch.float32, device=device)
        if self.replay_buffer.keep_behaviour_logps:
            behaviour = pad([r.behaviour_logps.to(device) for _, r in rows], padding_value=0.0)
            combined["flowrl_behaviour_logps"] = torch.cat(
                [torch.zeros(fresh, length, device=device), right(behaviour, 0.0)]
            )

        # Every process replays the same number of rows: the global figures are means over processes.
        metrics = self._metrics["train"]
        ages = torch.tensor(steps, dtype=torch.float32, device=device)
        stats = self.accelerator.gather(torch.stack([ages.mean(), replay["rewards"].float().mean()]).unsqueeze(0))
        metrics["flowrl/replay/share"].append(len(rows) / (fresh + len(rows)))
        metrics["flowrl/replay/age/mean"].append(stats[:, 0].mean().item())
        metrics["flowrl/replay/reward/mean"].append(stats[:, 1].mean().item())
        return combined

    def _reward_term(self, inputs):
        return inputs["advantages"] if self.args.reward_in_residual == "advantage" else inputs["rewards"]

    # ----------------------------------------------------------------------------------------------------------------
    # The loss.

    @contextmanager
    def _capture_prompt_representation(self, model, prompt_mask):
        """Collect the pooled prompt hidden states of the policy's forward passes run inside this context."""
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        # TRL's fused LM head runs `model.base_model` (the decoder stack) and never returns hidden states, but a hook
        # on that module sees them, gradients included.
        backbone = unwrapped.base_model
        prompt_length = prompt_mask.size(1)
        pooled = []

        def hook(module, args, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            start = sum(chunk.size(0) for chunk in pooled)
            rows = prompt_mask[start : start + hidden.size(0)]
            pooled.append(pool_prompt(hidden[:, :prompt_length], rows, self.args.log_z_pooling))

        handle = backbone.register_forward_hook(hook)
        try:
            yield pooled
        finally:
            handle.remove()

    def _sequence_sampling_ratio(self, inputs, mask):
        """TRL's vLLM importance-sampling correction as one weight per sequence, or None when it is off.

        GRPO multiplies its per-token loss by TRL's ratio; FlowRL's loss is per sequence, so a token-level ratio is
        multiplied over the sequence's tokens (in log space). The sequence-level modes, TRL's default among them, are
        used as they are.
        """
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            return None
        ratio = inputs["importance_sampling_ratio"]
        if ratio.dim() == 2 and ratio.size(1) == 1:
            return ratio.squeeze(1)
        log_ratio = torch.where(mask.bool(), torch.log(ratio), torch.zeros_like(ratio))
        return torch.exp(log_ratio.sum(dim=-1).clamp(max=_MAX_LOG_WEIGHT))

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)  # only the completion tokens are scored
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        use_head = self.log_z_head is not None
        capture = self._capture_prompt_representation(model, prompt_mask) if use_head else nullcontext([])
        with capture as pooled:
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{key: inputs.get(key) for key in _FORWARD_KEYS},
            )
        mode = "train" if self.model.training else "eval"
        if use_head:
            self.log_z_head.train(mode == "train")
            log_z = self.log_z_head(torch.cat(pooled))
        else:
            # The group estimate: precomputed at generation when this micro-batch holds parts of groups, else from
            # this very forward pass (every group is whole here).
            log_z = inputs.get("flowrl_log_z")

        rewards = inputs["rewards"]
        # Absent when the batch is used once, right after it was sampled: then π_old = π_θ and w = 1.
        old_per_token_logps = inputs.get("old_per_token_logps")
        replayed = inputs.get("flowrl_replayed")
        if "flowrl_behaviour_logps" in inputs:  # replay_importance_weight="clipped": against the rows' own sampler
            base = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            old_per_token_logps = torch.where(replayed.unsqueeze(1), inputs["flowrl_behaviour_logps"], base)
        terms = trajectory_balance_terms(
            log_z=log_z,
            per_token_logps=per_token_logps,
            ref_per_token_logps=inputs["ref_per_token_logps"],
            old_per_token_logps=old_per_token_logps,
            advantages=self._reward_term(inputs),
            completion_mask=mask,
            beta=self.args.beta,
            normalization=self.args.residual_normalization,
            clipping=self.args.importance_weight_clipping,
            weight_max=self.args.importance_weight_max,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            sampling_ratio=self._sequence_sampling_ratio(inputs, mask),
            sequence_mask=~torch.isnan(rewards),
            group_index=inputs.get("flowrl_group"),
        )
        # TRL leaves the gradient accumulation scaling to the trainer's loss (`loss_is_scaled_for_ga`).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = terms.loss / normalizer
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_flowrl_metrics(mode, terms, entropies, mask, replayed)
        return loss

    def _log_flowrl_metrics(self, mode, terms, entropies, mask, replayed=None):
        per_sequence = torch.stack(
            [
                terms.included.float(),
                terms.log_z,
                terms.residual,
                terms.log_importance_weight,
                terms.is_clipped.float(),
                terms.logp_gap,
                torch.zeros_like(terms.log_z) if replayed is None else replayed.float(),
            ],
            dim=1,
        )
        gathered = self.accelerator.gather(per_sequence).T
        included, log_z, residual, log_weight, is_clipped, logp_gap, replayed = gathered
        included = included.bool()
        metrics = self._metrics[mode]
        totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]), reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if not included.any():
            return
        if self.replay_buffer is not None and mode == "train":
            replayed = replayed.bool() & included
            if replayed.any():
                metrics["flowrl/replay/residual/abs_mean"].append(residual[replayed].abs().mean().item())
        log_z, residual, logp_gap = log_z[included], residual[included], logp_gap[included]
        weight = torch.exp(log_weight[included].clamp(max=_MAX_LOG_WEIGHT))
        metrics["flowrl/log_z/mean"].append(log_z.mean().item())
        metrics["flowrl/log_z/std"].append(log_z.std().item() if log_z.numel() > 1 else 0.0)
        metrics["flowrl/residual/mean"].append(residual.mean().item())
        metrics["flowrl/residual/abs_mean"].append(residual.abs().mean().item())
        metrics["flowrl/importance_weight/mean"].append(weight.mean().item())
        metrics["flowrl/importance_weight/max"].append(weight.max().item())
        metrics["flowrl/importance_weight/clip_fraction"].append(is_clipped[included].mean().item())
        metrics["flowrl/logp_gap/mean"].append(logp_gap.mean().item())

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints: FlowRL's state (the head, its optimizer and scheduler, and the settings that define the target) is
    # written with the policy's optimizer state, i.e. inside the checkpoint before it is pushed or older ones rotated.

    def _flowrl_state_dict(self) -> dict:
        head = self.log_z_head
        return {
            "format": _STATE_FORMAT,
            "settings": {name: getattr(self.args, name) for name in _RESUME_SETTINGS},
            "log_z_learning_rate": self._log_z_learning_rate if head is not None else None,
            "head": head.state_dict() if head is not None else None,
            "optimizer": self.log_z_optimizer.state_dict() if head is not None else None,
            "scheduler": self.log_z_scheduler.state_dict() if self.log_z_scheduler is not None else None,
            "replay": self._replay_state_dict(),
        }

    def _replay_state_dict(self) -> dict | None:
        if self.replay_buffer is None:
            return None
        version, internal, gauss_next = self._replay_rng.getstate()
        return {
            "buffer": self.replay_buffer.state_dict(),
            "rng": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }

    def _load_replay_state(self, path: str, state: dict | None) -> None:
        if state is None:
            logger.warning(
                f"{path} holds no replay buffer (it was written without replay_share): resuming with an empty store of "
                "past rollouts."
            )
            return
        try:
            self.replay_buffer.load_state_dict(state["buffer"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"Cannot resume the replay buffer from {path}: {error}. The file was edited or damaged after it was "
                "written; resume from an earlier checkpoint."
            ) from None
        rng = state["rng"]
        self._replay_rng.setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))
        dropped = self.replay_buffer.drop_longer_than(self.max_completion_length)
        if dropped:
            logger.warning(
                f"Dropped {dropped} stored completions longer than max_completion_length={self.max_completion_length} "
                f"from the replay buffer in {path}: this run could not have generated them."
            )

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            path = os.path.join(output_dir, LOG_Z_STATE_NAME)
            torch.save(self._flowrl_state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)  # a kill mid-write never leaves a truncated file under the real name

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LOG_Z_STATE_NAME)
        # The main process alone looks at the checkpoint and broadcasts its verdict: a rank that saw the file
        # differently (storage not shared, a stale NFS cache) would otherwise raise or return while the others wait in
        # the broadcast.
        message = [self._read_flowrl_state(checkpoint, path) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(message, from_process=0)
        verdict, payload = message[0]
        if verdict == "missing":
            raise FileNotFoundError(payload)
        if verdict == "unreadable":
            raise ValueError(payload)
        if verdict == "absent":
            if self.log_z_head is not None:
                logger.warning(payload)
            return
        state = payload
        self._check_resume_settings(path, state)
        if self.replay_buffer is not None:
            self._load_replay_state(path, state.get("replay"))
        if self.log_z_head is None:
            return
        self._check_saved_head(path, state["head"])
        # The tensors were read onto the CPU: load_state_dict copies them onto the head's device.
        self.log_z_head.load_state_dict(state["head"])
        self.log_z_optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and self.log_z_scheduler is not None:
            self.log_z_scheduler.load_state_dict(state["scheduler"])

    def _read_flowrl_state(self, checkpoint: str, path: str) -> tuple[str, object]:
        """On the main process: ("state", the state), or a verdict and its message ("missing", "unreadable", "absent":
        a checkpoint FlowRLTrainer did not write)."""
        if not os.path.isfile(path):
            written_by = saved_config_class(checkpoint)
            if written_by == type(self.args).__name__:
                return "missing", (
                    f"{checkpoint} was written by FlowRLTrainer but has no {LOG_Z_STATE_NAME} (the log Z head and the "
                    "settings of the run): the save was interrupted or the file was removed. Resume from an earlier, "
                    "complete checkpoint."
                )
            return "absent", (
                f"{path} not found: resuming with a freshly initialised log Z head. This is expected when resuming "
                f"from a checkpoint that FlowRLTrainer did not write (this one was written with "
                f"{written_by or 'unknown arguments'})."
            )
        state = _read_state(path)
        return ("unreadable", state) if isinstance(state, str) else ("state", state)

    def _check_saved_head(self, path: str, saved: dict) -> None:
        """The saved head must fit this run's head: same hidden size (that of the policy), same layers. The two
        determine every shape of the head."""
        expected = self.log_z_head.state_dict()
        # Every weight of the head ends in the hidden size (the Linear layers' input, the LayerNorms' size).
        saved_hidden = next(iter(saved.values())).shape[-1]
        hidden = next(iter(expected.values())).shape[-1]
        if saved_hidden != hidden:
            raise ValueError(
                f"Cannot resume the log Z head from {path}: it was saved for a policy of hidden size {saved_hidden}, "
                f"and this model ({get_config_model_id(self.model.config) or type(self.model).__name__}) has hidden "
                f"size {hidden}. Resume with the model that wrote the checkpoint, or start a new run."
            )
        if saved.keys() != expected.keys():
            saved_layers = sum(name.endswith(".weight") and value.dim() == 2 for name, value in saved.items())
            raise ValueError(
                f"Cannot resume the log Z head from {path}: it has {saved_layers} linear layers, this run's head has "
                f"log_z_num_layers={self.args.log_z_num_layers}. Resume with log_z_num_layers={saved_layers}."
            )

    def _check_resume_settings(self, path: str, state: dict) -> None:
        """A checkpoint resumes only the run it was written by: another target or head architecture is an error."""
        # Checkpoints written before the settings were saved (format 1) were all official-objective, head runs.
        saved = state.get("settings") or {"residual_normalization": "token_mean", "log_z_estimate": "head"}
        changed = [
            f"{name}: saved {saved[name]!r}, now {getattr(self.args, name)!r}"
            for name in _RESUME_SETTINGS
            if name in saved and saved[name] != getattr(self.args, name)
        ]
        if changed:
            raise ValueError(
                f"Cannot resume from {path}: these FlowRL settings differ from the run that wrote it ({'; '.join(changed)}). "
                "They define the target distribution or the log Z head, so resume with the saved values, or start a "
                "new run."
            )
        saved_lr = state.get("log_z_learning_rate")
        if (
            self.log_z_head is not None
            and saved_lr is not None
            and not math.isclose(saved_lr, self._log_z_learning_rate)
        ):
            logger.warning(
                f"Resuming the log Z head with its saved learning rate {saved_lr} (its optimizer and scheduler states "
                f"are restored, as the Trainer does for the policy); the configured {self._log_z_learning_rate} is not "
                "used."
            )
