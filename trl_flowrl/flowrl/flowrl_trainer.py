import inspect
import logging
import os
import textwrap
from contextlib import contextmanager

import torch
import torch.distributed as dist
from accelerate.utils import is_peft_model
from transformers import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from .flowrl_config import FlowRLConfig
from .log_z import LogZHead, pool_prompt
from .objective import _MAX_LOG_WEIGHT, trajectory_balance_terms


logger = logging.getLogger(__name__)

# Written into each checkpoint folder, beside the policy's optimizer state.
LOG_Z_STATE_NAME = "flowrl_log_z.pt"


class FlowRLTrainer(GRPOTrainer):
    """
    Trainer for FlowRL: matching the reward distribution instead of maximising the reward.

    FlowRL (https://huggingface.co/papers/2509.15207) trains the policy toward `p*(y|x) ∝ π_ref(y|x) · exp(β · r(x,y))`
    with a trajectory-balance loss and a learnable log-partition head, which keeps rare but valid reasoning paths alive
    where reward maximisation collapses onto the dominant one. It takes every argument of [`~trl.GRPOTrainer`]
    (model path or instance, reward functions and models, PEFT config, callbacks, vLLM settings) with a
    [`FlowRLConfig`]; only the objective changes.

    What differs from GRPOTrainer, and where:
    - `_compute_loss`: the trajectory-balance loss (`trajectory_balance_terms`) replaces GRPO's clipped surrogate. No KL
      term is added; `beta` is the reward scale, and being positive it makes TRL compute reference log-probs.
    - The log Z head reads the policy's final hidden states over the prompt, captured by a forward hook during the
      same training forward pass (no second pass). It is a module of its own with its own AdamW and scheduler, stepped
      after each gradient accumulation window with its gradients averaged over processes, so it is identical on every
      rank, absent from the saved policy and from the vLLM weight sync, and saved in every checkpoint.
    - `_calculate_rewards` / `_generate_and_score_completions`: keep the raw rewards, for `reward_in_residual="reward"`
      and to leave unscorable completions (every reward function returned None) out of the loss.
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
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)

        hidden_size = self.model.config.get_text_config().hidden_size
        # Seeded on its own so that every rank builds the same head without disturbing the global RNG streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            head = LogZHead(hidden_size, num_layers=args.log_z_num_layers, dropout=args.log_z_dropout)
        self.log_z_head = head.to(self.accelerator.device)
        self.log_z_optimizer = torch.optim.AdamW(
            self.log_z_head.parameters(),
            lr=args.log_z_learning_rate if args.log_z_learning_rate is not None else args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        self.log_z_scheduler = None  # built with the policy's scheduler, once the number of steps is known
        self._last_rewards_per_func = None

    # ----------------------------------------------------------------------------------------------------------------
    # The head's optimisation: its own optimizer, stepped at the end of every gradient accumulation window.

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
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
        if self.accelerator.sync_gradients:
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
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._last_rewards_per_func  # (B_global, num_reward_funcs), gathered over processes
        local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * local
        rewards_per_func = rewards_per_func[start : start + local]
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        # A completion that no reward function could score carries no signal: NaN keeps it out of the loss.
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        output["rewards"] = rewards
        return output

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

        with self._capture_prompt_representation(model, prompt_mask) as pooled:
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                num_images=inputs.get("num_images"),
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
                spatial_shapes=inputs.get("spatial_shapes"),
                num_tiles=inputs.get("num_tiles"),
                image_sizes=inputs.get("image_sizes"),
                token_type_ids=inputs.get("token_type_ids"),
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
                image_position_ids=inputs.get("image_position_ids"),
            )
        mode = "train" if self.model.training else "eval"
        self.log_z_head.train(mode == "train")
        log_z = self.log_z_head(torch.cat(pooled))

        rewards = inputs["rewards"]
        reward_term = inputs["advantages"] if self.args.reward_in_residual == "advantage" else rewards
        terms = trajectory_balance_terms(
            log_z=log_z,
            per_token_logps=per_token_logps,
            ref_per_token_logps=inputs["ref_per_token_logps"],
            # Absent when the batch is used once, right after it was sampled: then π_old = π_θ and w = 1.
            old_per_token_logps=inputs.get("old_per_token_logps"),
            advantages=reward_term,
            completion_mask=mask,
            beta=self.args.beta,
            clipping=self.args.importance_weight_clipping,
            weight_max=self.args.importance_weight_max,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            sampling_ratio=self._sequence_sampling_ratio(inputs, mask),
            sequence_mask=~torch.isnan(rewards),
        )
        # TRL leaves the gradient accumulation scaling to the trainer's loss (`loss_is_scaled_for_ga`).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = terms.loss / normalizer
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer

        self._log_flowrl_metrics(mode, terms, log_z, entropies, mask)
        return loss

    def _log_flowrl_metrics(self, mode, terms, log_z, entropies, mask):
        per_sequence = torch.stack(
            [
                terms.included.float(),
                log_z.detach().float(),
                terms.residual,
                terms.log_importance_weight,
                terms.is_clipped.float(),
                terms.logp_gap,
            ],
            dim=1,
        )
        included, log_z, residual, log_weight, is_clipped, logp_gap = self.accelerator.gather(per_sequence).T
        included = included.bool()
        metrics = self._metrics[mode]
        totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]), reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if not included.any():
            return
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
    # Checkpoints: the head, its optimizer and scheduler live beside the policy's optimizer state.

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state = {
                "head": self.log_z_head.state_dict(),
                "optimizer": self.log_z_optimizer.state_dict(),
                "scheduler": self.log_z_scheduler.state_dict() if self.log_z_scheduler is not None else None,
            }
            torch.save(state, os.path.join(checkpoint_dir, LOG_Z_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LOG_Z_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"{path} not found: resuming with a freshly initialised log Z head. This is expected only when "
                "resuming from a checkpoint that FlowRLTrainer did not write (a GRPO checkpoint, say)."
            )
            return
        state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self.log_z_head.load_state_dict(state["head"])
        self.log_z_optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and self.log_z_scheduler is not None:
            self.log_z_scheduler.load_state_dict(state["scheduler"])
