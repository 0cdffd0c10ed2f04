import logging
import math
from dataclasses import dataclass, field

from trl import GRPOConfig


logger = logging.getLogger(__name__)

# The values GRPOTrainer knows for `loss_type` (TRL 1.16); FlowRL accepts and ignores each of them.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")

# What `objective` sets. "official" is the official code's loss; "matching" departs from it (see the docstring).
OBJECTIVE_PRESETS = {
    "official": {"residual_normalization": "token_mean", "reward_in_residual": "advantage", "log_z_estimate": "head"},
    "matching": {"residual_normalization": "sum", "reward_in_residual": "reward", "log_z_estimate": "group"},
}
PRESET_BETA = {"official": 15.0, "matching": 15.0}


@dataclass
class FlowRLConfig(GRPOConfig):
    r"""
    Configuration class for [`FlowRLTrainer`].

    FlowRL ([Zhu et al., 2025](https://huggingface.co/papers/2509.15207)) trains the policy toward the reward
    distribution `p*(y|x) ∝ π_ref(y|x) · exp(β · r(x, y))` instead of maximising the reward. Every parameter of
    [`~trl.GRPOConfig`] keeps its meaning (generation, batching, vLLM, logging, ...) except the ones below. The
    per-sequence loss is

        δ_i = log Z(x) + g_i − β · r_i,   g_i = log π_θ(y_i) − log π_ref(y_i)   (token mean or sum, see below)
        loss = mean_i clip(w_i) · δ_i²,   w_i = Π_t π_θ(y_t) / π_old(y_t)  (detached)

    Two objectives, chosen with `objective`:

    - `"official"` (default): the official code's loss, unchanged, so the paper configs reproduce the paper: token-mean
      log-probs, the group-normalised advantage as r, a learnable log Z head, β = 15. What it does, precisely: its
      fixed point is `π_ref · exp(β · |y| · r)` (the token mean divides the log-ratio by the length |y| but not β · r),
      so for completions longer than one token it is much sharper than p*, and with the advantage as r its gradient is
      GRPO's (sequence-mean) plus a squared log-ratio pull toward π_ref of weight about 1/β. In practice it behaves
      like GRPO with a weak KL term; it matches p* only for one-token completions.
    - `"matching"` (**a departure from the paper**): an objective whose fixed point is p* whatever the completion
      length: exact trajectory balance with summed log-probs (`residual_normalization="sum"`), the raw reward
      (`reward_in_residual="reward"`), log Z estimated from each group (`log_z_estimate="group"`, no head, as in TBA's
      VarGrad trajectory balance) and β = 15. Among completions of equal reward it keeps π_ref's relative
      probabilities: rare but valid paths stay alive. It relies on gradient clipping (`max_grad_norm`, TRL's default
      1.0): a summed residual's gradient norm is far above 1 (measured: 20-300 on a 9-token toy, 5e3 at 1k and 3e4
      at 8k completion tokens), so every step is clipped to the same norm, which is what makes it match (see
      `residual_normalization`).

    `objective` only sets the defaults of the four fields it names (`residual_normalization`, `reward_in_residual`,
    `log_z_estimate`, `beta`); a value given explicitly always wins. After construction those fields hold the values
    in use.

    FlowRL adds no KL term and no entropy term, and its loss is one squared residual per sequence weighed by one
    importance weight per sequence. GRPO's options for its own loss are handled as follows:

    - Ignored, with one warning that names each one set: `loss_type` (token aggregation: FlowRL's loss is a mean over
      sequences; `residual_normalization` says how the length enters), `importance_sampling_level` (FlowRL always
      weighs each sequence by one weight, the product of its token ratios, clipped by `importance_weight_clipping`;
      it does not switch to GSPO's length-normalised ratio), `delta` (an upper bound on GRPO's ratio: FlowRL bounds
      its weight with `importance_weight_clipping`), `use_bias_correction_kl=True` (no KL term to correct) and
      `epsilon_high` when `importance_weight_clipping` is not `"symmetric"`. They are reset to their unset values, so
      GRPO's checks of them stay silent. A script that spells them out (`loss_type: dapo`) runs unchanged.
    - Refused: values GRPO itself does not know (a misspelt `loss_type` or `importance_sampling_level`), and `delta`
      with `importance_weight_clipping="none"` (the script asks for a bounded ratio and FlowRL's weight would be
      unbounded). `entropy_coef`, `use_adaptive_entropy`, `top_entropy_quantile` and `off_policy_mask_threshold` are
      refused too: each changes what GRPO optimises (an entropy bonus, a token or sequence mask), and FlowRL could
      only drop it silently.

    Two GRPO options change FlowRL's target when r is the advantage: `scale_rewards` (how the advantage is
    normalised: the official code divides by the group's standard deviation, TRL's default `"group"`) and
    `multi_objective_aggregation` (with several reward functions, whether they are summed before or normalised
    before summing). With the raw reward, the target uses the weighted sum of the reward functions (`reward_weights`).

    Parameters:
        objective (`str`, *optional*, defaults to `"official"`):
            `"official"` (the official code's loss) or `"matching"` (fixed point p*; a departure from the paper).
        beta (`float` or `None`, *optional*, defaults to `None`):
            Reward scale β of the target distribution `π_ref · exp(β · r)`. In FlowRL this is **not** a KL
            coefficient: no KL term is added. It must be positive and finite, which also makes TRL compute the
            reference log-probs that enter the residual. `None` takes the objective's value. Official: 15 (the paper's
            ablation, Qwen2.5-7B, Avg@16: β = 5 → 31.34, 10 → 34.41, 15 → 35.63, 30 → 35.09; with the advantage as r
            it is a gradient scale more than a target). Matching: 15, the same number with another role. With a 0/1
            reward, β sets the target's odds of a correct over a wrong completion to e^β times the reference's, while
            equally rewarded completions keep the reference's proportions whatever β. At β = 15 (odds 3.3 million) the
            target is, for any problem the reference solves at least once in a million samples, the reference
            restricted to its correct completions: it never asks to keep wrong answers, however hard the problem. A
            smaller β is a softer target (β = 5: odds 148, so a problem the reference solves 1% of the time has a
            target at 60% accuracy) that is matched sooner: larger β lets the reward dominate the residual, which
            slows the matching among correct completions. Measured with "sum" (2026-12-07): on the built-in task
            (benchmark 2, 300 steps, 3 seeds) β = 15 ends at 73.4% held-out accuracy, 3.39 distinct correct paths per
            problem and total variation 0.60 to the target; on the enumerable toy (500 steps, 9-token answers) at TV
            0.07 with β = 15 and 0.04 with β = 5. On the built-in task at 600 steps, β = 5 keeps 4.90 paths at TV 0.32
            but reaches 62.3% held-out accuracy, against β = 15's 80.1%, 3.02 and 0.65: the softer target keeps the
            proportions among correct completions better, and gains accuracy about half as fast.
        residual_normalization (`str` or `None`, *optional*, defaults to `None`):
            How the residual treats the completion length. `"token_mean"` (official): mean log-probs over tokens.
            `"sum"` (matching): summed log-probs, exact trajectory balance (fixed point p*). `"length"`: the summed
            residual divided by the completion length as a whole (the same fixed point; the matching preset until
            measured otherwise). `None` takes the objective's value. Why `"sum"` for the matching preset, measured
            with `benchmarks/bench_matching_toy.py` (an enumerable toy: a tiny transformer, 16 valid answers of 9
            tokens, or of 3 to 12, with uneven reference probabilities; exact total variation to p*, β = 15, 3
            seeds): after 1000 steps at a constant learning rate of 5e-4, `"sum"` ends at TV 0.045 (equal lengths;
            per seed 0.058, 0.035, 0.041) and 0.035 (unequal), `"length"` at 0.18 and 0.16; after 200 steps, each at
            its best of three rates, 0.14 and 0.15 against 0.45 and 0.24. Dividing by the length changes no fixed
            point, only the gradient's scale: a summed residual's gradient is above `max_grad_norm` at nearly every
            step and is clipped to it, the length-divided one (about n² smaller) is not and shrinks as the policy
            converges; clipping "length" at 1/81 instead of 1 nearly recovers "sum" (0.18 after 200 steps), a
            shorter Adam memory (β2 = 0.99) does not (0.42). Without clipping "sum" loses its lead (0.38 and 0.45):
            keep `max_grad_norm` set (FlowRL warns when it is not). Long completions stay bounded the same way: the summed
            residual's gradient norm grows with the length (5e3 at 1k tokens, 3e4 at 8k on a tiny model) and is
            clipped to `max_grad_norm`; longer completions then weigh more in the clipped direction.
        reward_in_residual (`str` or `None`, *optional*, defaults to `None`):
            What enters the residual as r_i. `"advantage"` (official): TRL's group-normalised advantage
            `(reward − group mean) / (group std + eps)` (with `scale_rewards="group"`, the default). `"reward"`: the raw
            reward (the weighted sum over reward functions), which the target p* is defined with. `None` takes the
            objective's value.
        log_z_estimate (`str` or `None`, *optional*, defaults to `None`):
            Where log Z(x) comes from. `"head"` (official): a learnable MLP on the prompt's hidden states (the fields
            `log_z_*` below). `"group"`: the group's own estimate, `mean_j (β · r_j − g_j)` over the completions of the
            prompt (VarGrad, Richter et al., 2020), detached: no parameters, nothing to train or checkpoint. It needs
            whole groups on each process (`per_device_train_batch_size * steps_per_generation` a multiple of
            `num_generations`; in evaluation, `per_device_eval_batch_size` a multiple of `num_generations_eval`, whose
            completions are grouped by prompt). When a loss micro-batch does not hold whole groups
            (`steps_per_generation > 1`), the estimate is computed at generation time from TRL's `old_per_token_logps`,
            or, when TRL has none, from one extra no-grad forward pass of the policy over the generation batch. `None`
            takes the objective's value.
        importance_weight_clipping (`str`, *optional*, defaults to `"clamp"`):
            How the detached sequence importance weight `w = Π_t π_θ/π_old` is clipped. `"clamp"`: `min(w,
            importance_weight_max)`, the maintained official code. `"symmetric"`: clip to `[1 - epsilon, 1 +
            epsilon_high]`, the paper's text (`epsilon` in (0, 1), `epsilon_high` positive and finite, None for
            `epsilon`). `"none"`: no clipping, the first official code release (its weight is still kept finite,
            `log w <= 80`). The ablation without importance sampling drops the 7B average from 35.63 to 26.71.
        importance_weight_max (`float`, *optional*, defaults to `10.0`):
            Upper bound of `w` for `importance_weight_clipping="clamp"` (the official code's value).
        log_z_num_layers (`int`, *optional*, defaults to `3`):
            Number of linear layers of the log Z head: `num_layers − 1` blocks of `Linear(h, h) → GELU → LayerNorm →
            Dropout`, then `Linear(h, 1)`, with `h` the policy's hidden size (the official head has 3, about `2h²`
            parameters: 25.7M at h = 3584). The head is a separate module with its own optimiser: it is never part of
            the saved policy or of the vLLM weight sync, and it is saved with each checkpoint. Unused with
            `log_z_estimate="group"`.
        log_z_dropout (`float`, *optional*, defaults to `0.1`):
            Dropout of the log Z head's hidden blocks (official value). `disable_dropout=True` sets it to 0 as well.
        log_z_pooling (`str`, *optional*, defaults to `"mean"`):
            How the prompt representation fed to the head is pooled from the policy's final hidden states, taken in the
            same training forward pass: `"mean"` over the prompt tokens (official) or `"last"` prompt token.
        log_z_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the log Z head's AdamW. `None` uses `learning_rate`, as the official code (1e-6 with
            weight decay 0.1). The head follows the same scheduler type, warm-up, weight decay and gradient clipping
            norm as the policy. Refused with `log_z_estimate="group"` (there is no head).

    > Parameters that control the replay of past rollouts (**a departure from both papers**, off by default; after
    > TBA, Bartoldson et al., 2025)

    Trajectory balance with the raw reward and summed (or length-divided) log-probs is zero for every completion
    exactly when the policy is p*, whichever distribution sampled the completions, so the matching objective can learn
    from completions generated at earlier steps, at the cost of a forward pass instead of a generation. With
    `replay_share > 0` every generated completion that was scored and has a token is stored per prompt (its token
    ids, raw reward, reference log-probs and the step that made it; a completion already stored for the prompt is not
    stored twice), and each generation batch takes `replay_share` of its groups from the store: whole groups of
    `num_generations` distinct completions of one stored prompt (so the group estimate of log Z stays that of one
    prompt), the rest generated as usual. The fresh prompts they displace are skipped. Nothing is generated for a
    replayed group. The store is saved in every checkpoint and identical on every process; prompts are stored with
    their token ids, so any dataset (iterable ones included) and both generation back-ends (transformers, vLLM) work.

    Parameters:
        replay_share (`float`, *optional*, defaults to `0.0`):
            Share of each generation batch's groups taken from the store, in [0, 1); 0 turns replay off. The number of
            replayed groups per process is `replay_share × groups` rounded up or down at random (with a generator
            shared by every process), so that the share holds on average; at least one group per process is always
            generated (so at most `(n − 1) / n` of a process's n groups are replayed, and the per-device generation
            batch must hold at least two groups); a batch replays only prompts with at least `num_generations` stored
            completions (none at the start). TBA replays with
            probability 1 − m per batch: 0.05 in its GSM8K script, 0.5 the best of its ablation. Needs a residual whose
            fixed point does not depend on the sampler: `reward_in_residual="reward"` and `residual_normalization`
            `"sum"` or `"length"` (the matching objective). It is refused with the official objective, whose reward
            term is the advantage within the sampled group and whose token-mean residual's fixed point moves with the
            completion length; its importance weight against the policy that sampled a stale row is mostly clipped.
            Also refused with `sync_ref_model` (the stored reference log-probs would go stale), with tools, rollout
            functions and environments, and with vision-language models.
        replay_buffer_per_prompt (`int`, *optional*, defaults to `100`):
            The newest this many distinct completions of a prompt are kept (TBA keeps 100). At least
            `num_generations`.
        replay_buffer_max_rows (`int`, *optional*, defaults to `100000`):
            At most this many completions in all; beyond it the oldest are evicted. Memory: 8 bytes per stored token
            (12 with `replay_importance_weight="clipped"`), on every process and in every checkpoint.
        replay_sampling (`str`, *optional*, defaults to `"uniform"`):
            How a replayed group's completions are drawn from its prompt's store: `"uniform"`, or `"reward"`:
            probability softmax(reward / `replay_temperature`), as TBA's reward-prioritised buffer, without
            replacement. Prompts are drawn uniformly among those with enough completions.
        replay_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature of `replay_sampling="reward"`; positive.
        replay_importance_weight (`str`, *optional*, defaults to `"none"`):
            What weighs a replayed completion's squared residual. `"none"`: no weight for its staleness, as trajectory
            balance allows (TBA): within the generation batch it gets the same weight as a fresh row (1 when the batch
            is used once). `"clipped"`: the importance weight `Π_t π_θ / π_sampling` against the policy that sampled
            it, clipped as `importance_weight_clipping` says; this turns the replayed rows' gradient back into an
            on-policy estimate, and keeps the sampling policy's log-probs in the store.
    """

    objective: str = field(
        default="official",
        metadata={
            "help": "'official' (the official code's loss) or 'matching' (fixed point p* for any completion length; a "
            "departure from the paper). Sets the defaults of residual_normalization, reward_in_residual, "
            "log_z_estimate and beta.",
            "choices": list(OBJECTIVE_PRESETS),
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "Reward scale of the target distribution pi_ref * exp(beta * r). Not a KL coefficient: FlowRL adds "
            "no KL term. Must be positive. None: the objective's value (15 for both)."
        },
    )
    residual_normalization: str | None = field(
        default=None,
        metadata={
            "help": "'token_mean' (official: mean log-probs), 'sum' (exact trajectory balance) or 'length' (summed "
            "residual divided by the length). None: the objective's value.",
            "choices": ["token_mean", "sum", "length"],
        },
    )
    reward_in_residual: str | None = field(
        default=None,
        metadata={
            "help": "What enters the residual as r: 'advantage' (group-normalised reward, official code) or 'reward' "
            "(raw reward). None: the objective's value.",
            "choices": ["advantage", "reward"],
        },
    )
    log_z_estimate: str | None = field(
        default=None,
        metadata={
            "help": "'head' (learnable log Z head, official) or 'group' (per-group estimate, no parameters). None: the "
            "objective's value.",
            "choices": ["head", "group"],
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

    replay_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of each generation batch's groups replayed from the store of past rollouts, in [0, 1); 0: "
            "no replay (the paper). A departure from the paper; needs the matching objective."
        },
    )
    replay_buffer_per_prompt: int = field(
        default=100,
        metadata={"help": "Newest distinct completions kept per prompt for replay (TBA: 100)."},
    )
    replay_buffer_max_rows: int = field(
        default=100_000,
        metadata={"help": "Completions kept for replay in all; the oldest are evicted beyond it."},
    )
    replay_sampling: str = field(
        default="uniform",
        metadata={
            "help": "How a replayed group's completions are drawn: 'uniform' or 'reward' (softmax(reward / "
            "replay_temperature)).",
            "choices": ["uniform", "reward"],
        },
    )
    replay_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of replay_sampling='reward'."},
    )
    replay_importance_weight: str = field(
        default="none",
        metadata={
            "help": "Weight of a replayed completion's residual: 'none' (as trajectory balance allows) or 'clipped' "
            "(importance weight against the policy that sampled it, clipped).",
            "choices": ["none", "clipped"],
        },
    )

    # GRPO loss options that FlowRL's loss has no place for. Their FlowRL defaults are "unset", so that a value a
    # script spells out (even GRPO's default) is seen, reported as ignored and reset.
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "Ignored by FlowRL, with a warning (its loss is a mean over sequences; see "
            "residual_normalization). Accepted so that GRPO scripts run unchanged."
        },
    )
    importance_sampling_level: str | None = field(
        default=None,
        metadata={
            "help": "Ignored by FlowRL, with a warning: it always weighs each sequence by one importance weight (see "
            "importance_weight_clipping). Accepted so that GRPO scripts run unchanged."
        },
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Ignored by FlowRL, with a warning when True: it adds no KL term."},
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVE_PRESETS:
            raise ValueError(
                f"objective must be one of {list(OBJECTIVE_PRESETS)}, got {self.objective!r}: 'official' is the "
                "official code's loss, 'matching' the objective whose fixed point is the target distribution."
            )
        for name, value in OBJECTIVE_PRESETS[self.objective].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.beta is None:
            self.beta = PRESET_BETA[self.objective]
        super().__post_init__()
        self._check_flowrl_fields()
        self._check_replay_fields()
        self._warn_unclipped_sum()
        self._refuse_grpo_loss_options()
        self._ignore_grpo_loss_options()

    def describe_objective(self) -> str:
        """One line naming the objective in use and its ingredients, for logs and summaries."""
        kind = (
            "the official code's loss"
            if self.objective == "official"
            else "a departure from the paper: trajectory balance whose fixed point is the target distribution"
        )
        return (
            f"FlowRL objective={self.objective!r} ({kind}): residual_normalization={self.residual_normalization!r}, "
            f"reward_in_residual={self.reward_in_residual!r}, log_z_estimate={self.log_z_estimate!r}, "
            f"beta={self.beta:g}"
        )

    def _check_flowrl_fields(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(
                f"FlowRLConfig.beta is the reward scale of the target distribution and must be positive and finite, "
                f"got {self.beta}. The paper uses beta=15. (In FlowRL, beta is not a KL "
                "coefficient: no KL term is added.)"
            )
        if self.residual_normalization not in ("token_mean", "sum", "length"):
            raise ValueError(
                f"residual_normalization must be 'token_mean', 'sum' or 'length', got {self.residual_normalization!r}."
            )
        if self.reward_in_residual not in ("advantage", "reward"):
            raise ValueError(f"reward_in_residual must be 'advantage' or 'reward', got {self.reward_in_residual!r}.")
        if self.log_z_estimate not in ("head", "group"):
            raise ValueError(f"log_z_estimate must be 'head' or 'group', got {self.log_z_estimate!r}.")
        if self.importance_weight_clipping not in ("clamp", "symmetric", "none"):
            raise ValueError(
                f"importance_weight_clipping must be 'clamp', 'symmetric' or 'none', got "
                f"{self.importance_weight_clipping!r}."
            )
        if self.importance_weight_clipping == "clamp" and not (
            math.isfinite(self.importance_weight_max) and self.importance_weight_max > 0
        ):
            raise ValueError(
                f"importance_weight_max must be positive and finite with importance_weight_clipping='clamp', got "
                f"{self.importance_weight_max}. The official value is 10 (use importance_weight_clipping='none' for no "
                "clipping)."
            )
        if self.importance_weight_clipping == "symmetric":
            if not 0 < self.epsilon < 1:
                raise ValueError(
                    "importance_weight_clipping='symmetric' clips to [1 - epsilon, 1 + epsilon_high], so epsilon "
                    f"must be in (0, 1), got {self.epsilon}."
                )
            # A negative upper bound would make the weight negative and turn the squared residual into a loss to
            # maximise; NaN would poison every weight.
            if self.epsilon_high is not None and not (math.isfinite(self.epsilon_high) and self.epsilon_high > 0):
                raise ValueError(
                    "importance_weight_clipping='symmetric' clips to [1 - epsilon, 1 + epsilon_high], so "
                    f"epsilon_high must be positive and finite, got {self.epsilon_high}. Leave it None to use epsilon "
                    f"({self.epsilon})."
                )
        if self.log_z_num_layers < 1:
            raise ValueError(f"log_z_num_layers must be at least 1 (the output layer), got {self.log_z_num_layers}.")
        if not 0 <= self.log_z_dropout < 1:
            raise ValueError(f"log_z_dropout must be in [0, 1), got {self.log_z_dropout}.")
        if self.log_z_pooling not in ("mean", "last"):
            raise ValueError(f"log_z_pooling must be 'mean' or 'last', got {self.log_z_pooling!r}.")
        if self.log_z_learning_rate is not None:
            if self.log_z_estimate == "group":
                raise ValueError(
                    "log_z_learning_rate is the log Z head's learning rate, but log_z_estimate='group' has no head. "
                    "Unset log_z_learning_rate, or set log_z_estimate='head'."
                )
            if not (math.isfinite(self.log_z_learning_rate) and self.log_z_learning_rate > 0):
                raise ValueError(
                    f"log_z_learning_rate must be positive and finite, or None to use learning_rate; got "
                    f"{self.log_z_learning_rate}."
                )
        if self.log_z_estimate == "group":
            local_generation_batch = self.per_device_train_batch_size * self.steps_per_generation
            if local_generation_batch % self.num_generations != 0:
                raise ValueError(
                    f"log_z_estimate='group' estimates log Z from each prompt's group on its own process, so the "
                    f"per-device generation batch (per_device_train_batch_size * steps_per_generation = "
                    f"{local_generation_batch}) must be a multiple of num_generations ({self.num_generations}). "
                    "Change the batch sizes, or use log_z_estimate='head'."
                )
            eval_group = self.num_generations_eval or self.num_generations
            if self.do_eval and self.eval_strategy != "no" and self.per_device_eval_batch_size % eval_group != 0:
                raise ValueError(
                    f"log_z_estimate='group' estimates log Z from each prompt's group on its own process, so "
                    f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be a multiple of the "
                    f"completions per prompt in evaluation (num_generations_eval or num_generations: {eval_group})."
                )

    def _check_replay_fields(self):
        if not (isinstance(self.replay_share, (int, float)) and 0 <= self.replay_share < 1):
            raise ValueError(
                f"replay_share is the share of each generation batch's groups replayed from past rollouts and must be "
                f"in [0, 1), got {self.replay_share}. Use 0 for no replay."
            )
        if self.replay_sampling not in ("uniform", "reward"):
            raise ValueError(f"replay_sampling must be 'uniform' or 'reward', got {self.replay_sampling!r}.")
        if self.replay_importance_weight not in ("none", "clipped"):
            raise ValueError(
                f"replay_importance_weight must be 'none' or 'clipped', got {self.replay_importance_weight!r}."
            )
        if not (math.isfinite(self.replay_temperature) and self.replay_temperature > 0):
            raise ValueError(f"replay_temperature must be positive and finite, got {self.replay_temperature}.")
        if self.replay_share == 0:
            return
        if self.reward_in_residual != "reward" or self.residual_normalization not in ("sum", "length"):
            raise ValueError(
                "replay_share > 0 replays completions sampled by earlier policies, which only a residual whose fixed "
                "point does not depend on the sampler can learn from: reward_in_residual='reward' and "
                "residual_normalization 'sum' or 'length' (objective='matching'), got "
                f"reward_in_residual={self.reward_in_residual!r}, residual_normalization="
                f"{self.residual_normalization!r}. The official objective's advantage is computed within the sampled "
                "group and its token-mean residual has another fixed point. Set objective='matching', or replay_share=0."
            )
        if self.sync_ref_model:
            raise ValueError(
                "replay_share > 0 stores the reference log-probs of each completion, which sync_ref_model would make "
                "stale. Set sync_ref_model=False, or replay_share=0."
            )
        if self.replay_buffer_per_prompt < self.num_generations:
            raise ValueError(
                f"replay_buffer_per_prompt ({self.replay_buffer_per_prompt}) must be at least num_generations "
                f"({self.num_generations}): a replayed group is num_generations distinct completions of one prompt."
            )
        if self.replay_buffer_max_rows < self.replay_buffer_per_prompt:
            raise ValueError(
                f"replay_buffer_max_rows ({self.replay_buffer_max_rows}) must be at least replay_buffer_per_prompt "
                f"({self.replay_buffer_per_prompt})."
            )
        local_generation_batch = self.per_device_train_batch_size * self.steps_per_generation
        if local_generation_batch < 2 * self.num_generations:
            raise ValueError(
                f"replay_share > 0 replaces whole groups and always generates at least one group per process, so the "
                f"per-device generation batch (per_device_train_batch_size * steps_per_generation = "
                f"{local_generation_batch}) must hold at least two groups of num_generations ({self.num_generations}): "
                "with one group per process nothing would ever be replayed. Raise the batch or steps_per_generation."
            )
        if local_generation_batch % self.num_generations != 0:
            raise ValueError(
                f"replay_share > 0 replaces whole groups, so the per-device generation batch "
                f"(per_device_train_batch_size * steps_per_generation = {local_generation_batch}) must be a multiple "
                f"of num_generations ({self.num_generations})."
            )

    def _refuse_grpo_loss_options(self):
        # Options that change what GRPO optimises (a bonus or a mask). FlowRL could only drop them silently.
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

    def _warn_unclipped_sum(self):
        # Not an error: the fixed point is the same; but on the toy of benchmarks/bench_matching_toy.py unclipped
        # summed residuals ended about 3x farther from the target (see residual_normalization).
        if self.residual_normalization == "sum" and not (self.max_grad_norm and self.max_grad_norm > 0):
            logger.warning(
                "FlowRL with residual_normalization='sum' and no gradient clipping (max_grad_norm=%s): summed "
                "residuals have gradient norms far above 1 that grow with the completion length, and without clipping "
                "they ended about 3x farther from the target distribution (total variation) in "
                "benchmarks/bench_matching_toy.py. Set max_grad_norm (TRL's default is 1.0).",
                self.max_grad_norm,
            )

    def _ignore_grpo_loss_options(self):
        # How GRPO aggregates and clips its per-token loss has no counterpart in FlowRL's per-sequence residual. A GRPO
        # script that spells these out must still run after the class swap, so they are reported and reset (GRPOTrainer
        # would otherwise warn about, or refuse, combinations of them that FlowRL never uses).
        if self.loss_type is not None and self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not one of GRPO's loss types {GRPO_LOSS_TYPES}. FlowRL ignores "
                "loss_type (its loss is a mean over sequences); remove it, or spell one of GRPO's."
            )
        if self.importance_sampling_level not in (None, "token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence' (GRPO's values), got "
                f"{self.importance_sampling_level!r}. FlowRL ignores it; remove it."
            )
        if self.delta is not None and self.importance_weight_clipping == "none":
            raise ValueError(
                f"delta={self.delta} asks for an upper bound on the importance ratio, but "
                "importance_weight_clipping='none' leaves FlowRL's sequence weight unbounded. Remove delta, or bound "
                "the weight with importance_weight_clipping='clamp' (importance_weight_max) or 'symmetric'."
            )
        reasons = {
            "loss_type": "FlowRL's loss is a mean over sequences of the squared residual; residual_normalization sets "
            "how the length enters",
            "importance_sampling_level": "FlowRL weighs each sequence by one importance weight, the product of its "
            "token ratios, clipped by importance_weight_clipping (GSPO's length-normalised ratio is not used)",
            "delta": "FlowRL bounds its sequence weight with importance_weight_clipping "
            f"({self.importance_weight_clipping!r})",
            "use_bias_correction_kl": "FlowRL adds no KL term (beta is its reward scale)",
            "epsilon_high": "it bounds the weight only with importance_weight_clipping='symmetric', and this run uses "
            f"{self.importance_weight_clipping!r}",
        }
        ignored = {
            "loss_type": self.loss_type is not None,
            "importance_sampling_level": self.importance_sampling_level is not None,
            "delta": self.delta is not None,
            "use_bias_correction_kl": bool(self.use_bias_correction_kl),
            "epsilon_high": self.epsilon_high is not None and self.importance_weight_clipping != "symmetric",
        }
        ignored = [name for name, is_set in ignored.items() if is_set]
        if not ignored:
            return
        logger.warning(
            "FlowRL ignores these GRPO loss options: "
            + "; ".join(f"{name}={getattr(self, name)!r} ({reasons[name]})" for name in ignored)
            + ". Remove them to silence this warning."
        )
        for name in ignored:
            setattr(self, name, False if name == "use_bias_correction_kl" else None)
