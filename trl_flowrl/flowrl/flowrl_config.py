from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class FlowRLConfig(GRPOConfig):
    r"""
    Configuration class for [`FlowRLTrainer`].

    FlowRL ([Zhu et al., 2025](https://huggingface.co/papers/2509.15207)) trains the policy to match the reward
    distribution `p*(y|x) ∝ π_ref(y|x) · exp(β · r(x, y))` instead of maximising the reward. Every parameter of
    [`~trl.GRPOConfig`] keeps its meaning (generation, batching, vLLM, logging, ...) except the ones below. The
    per-sequence loss is

        δ_i = log Z(x) + mean_t log π_θ(y_t) − β · r_i − mean_t log π_ref(y_t)
        loss = mean_i clip(w_i) · δ_i²,   w_i = Π_t π_θ(y_t) / π_old(y_t)  (detached)

    FlowRL adds no KL term and no entropy term, so `entropy_coef`, `top_entropy_quantile`, `off_policy_mask_threshold`
    and `loss_type` do not apply; setting the first three is refused.

    Parameters:
        beta (`float`, *optional*, defaults to `15.0`):
            Reward scale β of the target distribution `π_ref · exp(β · r)`. In FlowRL this is **not** a KL
            coefficient: no KL term is added to the loss. It must be positive, which also makes TRL compute the
            reference log-probs that enter the residual. The paper's ablation (Qwen2.5-7B, Avg@16) found 15 best:
            β = 5 → 31.34, 10 → 34.41, 15 → 35.63, 30 → 35.09.
        importance_weight_clipping (`str`, *optional*, defaults to `"clamp"`):
            How the detached sequence importance weight `w = Π_t π_θ/π_old` is clipped. `"clamp"`: `min(w,
            importance_weight_max)`, the maintained official code. `"symmetric"`: clip to `[1 - epsilon, 1 +
            epsilon_high]`, the paper's text. `"none"`: no clipping, the first official code release (its weight is
            still kept finite, `log w <= 80`). The ablation without importance sampling drops the 7B average from 35.63
            to 26.71.
        importance_weight_max (`float`, *optional*, defaults to `10.0`):
            Upper bound of `w` for `importance_weight_clipping="clamp"` (the official code's value).
        reward_in_residual (`str`, *optional*, defaults to `"advantage"`):
            What enters the residual as `r_i`. `"advantage"`: TRL's group-normalised advantage
            `(reward − group mean) / (group std + eps)`, as the official code (with `scale_rewards="group"`, the
            default). `"reward"`: the raw reward (the weighted sum over reward functions).
        log_z_num_layers (`int`, *optional*, defaults to `3`):
            Number of linear layers of the log Z head: `num_layers − 1` blocks of `Linear(h, h) → GELU → LayerNorm →
            Dropout`, then `Linear(h, 1)`, with `h` the policy's hidden size (the official head has 3, about `2h²`
            parameters: 25.7M at h = 3584). The head is a separate module with its own optimiser: it is never part of
            the saved policy or of the vLLM weight sync, and it is saved with each checkpoint.
        log_z_dropout (`float`, *optional*, defaults to `0.1`):
            Dropout of the log Z head's hidden blocks (official value).
        log_z_pooling (`str`, *optional*, defaults to `"mean"`):
            How the prompt representation fed to the head is pooled from the policy's final hidden states, taken in the
            same training forward pass: `"mean"` over the prompt tokens (official) or `"last"` prompt token.
        log_z_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the log Z head's AdamW. `None` uses `learning_rate`, as the official code (1e-6 with
            weight decay 0.1). The head follows the same scheduler type, warm-up, weight decay and gradient clipping
            norm as the policy.
    """

    beta: float = field(
        default=15.0,
        metadata={
            "help": "Reward scale of the target distribution pi_ref * exp(beta * r). Not a KL coefficient: FlowRL adds "
            "no KL term. Must be positive. Paper: 15."
        },
    )
    importance_weight_clipping: str = field(
        default="clamp",
        metadata={
            "help": "Clipping of the sequence importance weight: 'clamp' (min(w, importance_weight_max), official "
            "code), 'symmetric' ([1 - epsilon, 1 + epsilon_high], paper text) or 'none' (first code release).",
            "choices": ["clamp", "symmetric", "none"],
        },
    )
    importance_weight_max: float = field(
        default=10.0,
        metadata={
            "help": "Upper bound of the importance weight with importance_weight_clipping='clamp'. Official: 10."
        },
    )
    reward_in_residual: str = field(
        default="advantage",
        metadata={
            "help": "What enters the residual as r: 'advantage' (group-normalised reward, official code) or 'reward' "
            "(raw reward).",
            "choices": ["advantage", "reward"],
        },
    )
    log_z_num_layers: int = field(
        default=3,
        metadata={"help": "Number of linear layers of the log Z head (official: 3)."},
    )
    log_z_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout of the log Z head's hidden blocks (official: 0.1)."},
    )
    log_z_pooling: str = field(
        default="mean",
        metadata={
            "help": "Pooling of the prompt's final hidden states into the head's input: 'mean' over prompt tokens "
            "(official) or 'last' prompt token.",
            "choices": ["mean", "last"],
        },
    )
    log_z_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the log Z head. None: the policy's learning_rate (official)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(
                f"FlowRLConfig.beta is the reward scale of the target distribution and must be positive, got "
                f"{self.beta}. The paper uses beta=15. (In FlowRL, beta is not a KL coefficient: no KL term is added.)"
            )
        if self.importance_weight_clipping not in ("clamp", "symmetric", "none"):
            raise ValueError(
                f"importance_weight_clipping must be 'clamp', 'symmetric' or 'none', got "
                f"{self.importance_weight_clipping!r}."
            )
        if self.importance_weight_clipping == "clamp" and self.importance_weight_max <= 0:
            raise ValueError(
                f"importance_weight_max must be positive with importance_weight_clipping='clamp', got "
                f"{self.importance_weight_max}. The official value is 10."
            )
        if self.importance_weight_clipping == "symmetric" and not 0 < self.epsilon < 1:
            raise ValueError(
                f"importance_weight_clipping='symmetric' clips to [1 - epsilon, 1 + epsilon_high], so epsilon must be "
                f"in (0, 1), got {self.epsilon}."
            )
        if self.reward_in_residual not in ("advantage", "reward"):
            raise ValueError(f"reward_in_residual must be 'advantage' or 'reward', got {self.reward_in_residual!r}.")
        if self.log_z_num_layers < 1:
            raise ValueError(f"log_z_num_layers must be at least 1 (the output layer), got {self.log_z_num_layers}.")
        if not 0 <= self.log_z_dropout < 1:
            raise ValueError(f"log_z_dropout must be in [0, 1), got {self.log_z_dropout}.")
        if self.log_z_pooling not in ("mean", "last"):
            raise ValueError(f"log_z_pooling must be 'mean' or 'last', got {self.log_z_pooling!r}.")
        if self.log_z_learning_rate is not None and self.log_z_learning_rate <= 0:
            raise ValueError(
                f"log_z_learning_rate must be positive, or None to use learning_rate; got {self.log_z_learning_rate}."
            )
        # Options of GRPO's loss that FlowRL's objective has no place for. Refuse them rather than ignore them.
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                "FlowRL adds no entropy term to its loss: set entropy_coef=0.0 and use_adaptive_entropy=False."
            )
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                "top_entropy_quantile masks tokens of GRPO's per-token loss; FlowRL's loss is per sequence. "
                "Set top_entropy_quantile=1.0."
            )
        if self.off_policy_mask_threshold is not None:
            raise ValueError(
                "off_policy_mask_threshold is a GRPO loss option that FlowRL does not use; set it to None. FlowRL "
                "bounds off-policy updates with importance_weight_clipping instead."
            )
