import math
from dataclasses import dataclass, field

from trl import GRPOConfig


# Loss aggregations whose per-token loss ExGRPO can re-weight token by token. The others (cispo, sapo, luspo, vespo)
# replace the per-token surrogate itself, which ExGRPO's mixed objective already does.
SUPPORTED_LOSS_TYPES = ("dr_grpo", "dapo", "bnpo", "grpo")
TRAJECTORY_SELECTIONS = ("lowest_entropy", "highest_entropy", "random")
QUESTION_SELECTIONS = ("gaussian", "linear", "sqrt", "linear_clip", "uniform")
DISPLACED_QUESTIONS = ("drop", "requeue")


@dataclass
class ExGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`ExGRPOTrainer`].

    ExGRPO ([Zhan et al., 2025](https://huggingface.co/papers/2510.02245)) is GRPO with a replay buffer of past
    successes. After a warm-up, it stores the distinct correct trajectories of partially solved questions and, each
    step, replays some of them: a buffered question of medium difficulty gets its stored trajectory (the one of lowest
    entropy under the current policy) plus `num_generations - 1` fresh completions, and the advantage is computed over
    that mixed group. Replayed tokens are weighted by the shaped importance weight `f(w) = w / (w + shaping)` with
    `w = π_θ / π_stored`, without clipping. Every parameter of [`~trl.GRPOConfig`] keeps its meaning, except the two
    defaults below and the features that are refused.

    Defaults that differ from [`~trl.GRPOConfig`]:
        scale_rewards (`str`, defaults to `"none"`):
            The paper's advantage is `reward - group mean`, without division by the group's standard deviation.
        loss_type (`str`, defaults to `"dr_grpo"`):
            The paper sums token losses and divides by a constant (Dr. GRPO). `"dapo"`, `"bnpo"` and `"grpo"` are also
            supported; the others are refused because they replace the per-token surrogate.

    The paper's ablations are switches: `question_selection`, `trajectory_selection`, `replay_policy_shaping`,
    `replay_importance_correction`, `replay_ratio` (and `replay_ratio=0.0` for no replay at all).

    Refused (construction fails with a message): `use_adaptive_entropy`, `top_entropy_quantile < 1`,
    `off_policy_mask_threshold`, `importance_sampling_level="sequence"` and `delta` (two-sided clipping). A static
    `entropy_coef` is supported as in GRPO; the paper's bonus (0.001 on a loss about 64 times larger than TRL's
    `dr_grpo` scale) is about 1e-4 in TRL terms, and the default stays 0.

    Parameters:
        replay_ratio (`float`, *optional*, defaults to `0.5`):
            Fraction ρ of a generation batch's questions taken from the buffer once replay has started:
            `floor(ρ · questions)`, or fewer when the buffer holds fewer questions. Paper: 0.5 (ablation: 0.25 → 46.4,
            0.5 → 48.3, 0.75 → 44.8 in-distribution average on Qwen2.5-Math-7B). `0.0`: no replay, and no buffer:
            no trajectory, bucket or dataset row is kept or checkpointed (the phase switch, which lifts fresh clipping
            with `unclip_fresh_after_switch`, and retirement still act and are still checkpointed).
        delayed_start_threshold (`float`, *optional*, defaults to `0.35`):
            Warm-up: plain GRPO until the mean accuracy of a generation batch's completions first exceeds this value.
            The switch is one-way; collection starts with the batch that triggered it and replay with the next
            generation. Paper: 0.35. `0.0` switches as soon as one completion is correct.
        replay_weight_shaping (`float`, *optional*, defaults to `0.1`):
            Constant `s` of the shaped importance weight of replayed tokens, `f(w) = w / (w + s)`. Paper: 0.1 (without
            shaping the 7B in-distribution average falls from 48.3 to 41.2).
        bucket_center (`float` or `None`, *optional*, defaults to `None`):
            Centre of the Gaussian that weighs buffer buckets when drawing questions, in success counts (a question's
            bucket is the number of correct completions in its latest group). `None` uses `num_generations / 2`, as
            the paper.
        bucket_width (`float`, *optional*, defaults to `1.0`):
            Standard deviation of that Gaussian, in success counts: bucket `k` is drawn with probability proportional
            to `exp(-(k - center)² / (2 · width²))` among the non-empty buckets. Paper and official code: 1 count (the
            paper's text writes 1 on the accuracy scale, which would be nearly uniform).
        question_selection (`str`, *optional*, defaults to `"gaussian"`):
            How buffered questions are drawn for replay. `"gaussian"` (paper and official default): a bucket by the
            Gaussian above, then a question uniformly inside it. The official code's other bucket weightings, for k
            successes out of K: `"linear"` (k / K), `"sqrt"` (sqrt(k / K)), `"linear_clip"` (k / K up to K / 2, then
            0.5). `"uniform"`: uniformly over the buffered questions, the paper's ablation without question selection
            (in-distribution average 48.3 → 46.7; without question and trajectory selection 46.1). Bucket weights do not
            depend on how many questions a bucket holds, so a thin middle bucket is replayed often; the
            `replay/max_replays_per_question` metric shows it.
        replay_policy_shaping (`bool`, *optional*, defaults to `True`):
            Whether replayed tokens use the shaped weight `f(w)`. `False` is the paper's ablation without policy
            shaping: the plain, unclipped ratio `w` (the official code's `off_policy_reshape="no_reshape"`): 48.3 →
            41.2.
        replay_importance_correction (`bool`, *optional*, defaults to `True`):
            Whether replayed tokens' ratio `w` is taken against the stored log-probs of the policy that generated them.
            `False` is the paper's ablation without importance correction (official `exp_is_correct=False`): `w` is
            taken against the policy that started the step (detached), as if the trajectory were on-policy, and
            `f(w)` still applies: 48.3 → 47.1.
        displaced_questions (`str`, *optional*, defaults to `"drop"`):
            What happens to the fresh questions that replayed ones displace from a generation batch. `"drop"` (the
            official code): they are skipped for the epoch, so with `replay_ratio=0.5` a run trains on about half as
            many distinct fresh questions. `"requeue"` (**a departure from the paper**): they wait in a queue and take
            the next fresh slots, so the fresh questions are those of GRPO's stream, only later; the queue (question
            rows) is saved with the checkpoint. Meant for tasks where fresh questions are plentiful.
        trajectory_selection (`str`, *optional*, defaults to `"lowest_entropy"`):
            Which stored trajectory of a selected question is replayed: `"lowest_entropy"` (the paper: lowest mean
            per-token entropy under the current policy), `"highest_entropy"` or `"random"` (ablations: 46.0 and 46.3
            versus 48.3).
        retire_solved_questions (`bool`, *optional*, defaults to `True`):
            Whether a question whose whole group was correct also leaves the fresh-question sampler (its groups are
            then replaced by other, unretired questions of the dataset). Such a question always leaves the buffer
            permanently. Paper: yes.
        unclip_fresh_after_switch (`bool`, *optional*, defaults to `True`):
            Whether fresh tokens lose PPO clipping once replay has started (their loss becomes `-ratio · A`). The
            official code does this; the paper's text does not mention it.
        question_id_column (`str` or `None`, *optional*, defaults to `None`):
            Dataset column that identifies a question across epochs. `None` identifies a question by a hash (SHA-1) of
            its prompt. Rows that share an id are one question; its replayed groups use the first such row (its
            prompt and its other columns, e.g. the solution the reward reads). A row whose id is missing (None, NaN
            or an empty string) is identified by the hash of its prompt instead, with a warning naming the rows.
        success_threshold (`float`, *optional*, defaults to `1.0`):
            A completion counts as correct when its reward (the weighted sum over reward functions) is at least this.
            The paper's rewards are 0/1 correctness, hence 1.0. Completions whose every reward is `None` never count.
        max_trajectories_per_question (`int` or `None`, *optional*, defaults to `None`):
            Cap on the stored trajectories of one question; the oldest is evicted first. `None`: unbounded, as the
            paper.
        max_buffer_trajectories (`int` or `None`, *optional*, defaults to `None`):
            Cap on all stored trajectories; the oldest is evicted first. `None`: unbounded, as the paper, whose 7B run
            ended with about 202k trajectories in 1.77 GB of CPU memory. Each stored token costs 8 bytes here (an
            int32 token id and a float32 log-prob) on every process.
    """

    replay_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of a generation batch's questions taken from the replay buffer once replay has started. "
            "Paper: 0.5."
        },
    )
    delayed_start_threshold: float = field(
        default=0.35,
        metadata={
            "help": "Plain GRPO until a generation batch's mean accuracy first exceeds this; then collection and replay "
            "start (one-way). Paper: 0.35."
        },
    )
    replay_weight_shaping: float = field(
        default=0.1,
        metadata={"help": "Constant s of the shaped weight f(w) = w / (w + s) of replayed tokens. Paper: 0.1."},
    )
    bucket_center: float | None = field(
        default=None,
        metadata={
            "help": "Centre of the Gaussian over buffer buckets, in success counts. None: num_generations / 2 (paper)."
        },
    )
    bucket_width: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the Gaussian over buffer buckets, in success counts. Paper: 1."},
    )
    trajectory_selection: str = field(
        default="lowest_entropy",
        metadata={
            "help": "Stored trajectory replayed for a selected question: 'lowest_entropy' (paper), 'highest_entropy' "
            "or 'random' (ablations).",
            "choices": list(TRAJECTORY_SELECTIONS),
        },
    )
    retire_solved_questions: bool = field(
        default=True,
        metadata={
            "help": "Whether questions solved by every completion of a group also leave the fresh-question sampler "
            "(they always leave the buffer). Paper: yes."
        },
    )
    unclip_fresh_after_switch: bool = field(
        default=True,
        metadata={"help": "Whether fresh tokens lose PPO clipping once replay has started. Official code: yes."},
    )
    question_id_column: str | None = field(
        default=None,
        metadata={"help": "Dataset column identifying a question. None: a SHA-1 hash of the prompt."},
    )
    question_selection: str = field(
        default="gaussian",
        metadata={
            "help": "How buffered questions are drawn for replay: a bucket by 'gaussian' weight (paper), or the "
            "official code's 'linear', 'sqrt', 'linear_clip' weightings, or 'uniform' over questions (ablation "
            "without question selection).",
            "choices": list(QUESTION_SELECTIONS),
        },
    )
    replay_policy_shaping: bool = field(
        default=True,
        metadata={
            "help": "Whether replayed tokens use the shaped weight f(w) = w / (w + s) (paper) or the plain, unclipped "
            "ratio w (ablation: 48.3 -> 41.2)."
        },
    )
    replay_importance_correction: bool = field(
        default=True,
        metadata={
            "help": "Whether replayed tokens' ratio is taken against the stored log-probs (paper) or against the "
            "current policy's, as if on-policy (ablation: 48.3 -> 47.1)."
        },
    )
    displaced_questions: str = field(
        default="drop",
        metadata={
            "help": "What happens to the fresh questions a replay displaces: 'drop' (skipped for the epoch, paper's "
            "code) or 'requeue' (trained at the next fresh slots; a departure from the paper).",
            "choices": list(DISPLACED_QUESTIONS),
        },
    )
    success_threshold: float = field(
        default=1.0,
        metadata={"help": "A completion is correct when its (weighted, summed) reward is at least this. Paper: 1.0."},
    )
    max_trajectories_per_question: int | None = field(
        default=None,
        metadata={"help": "Cap on stored trajectories per question, oldest evicted first. None: unbounded (paper)."},
    )
    max_buffer_trajectories: int | None = field(
        default=None,
        metadata={
            "help": "Cap on all stored trajectories, oldest evicted first. None: unbounded (paper: about 202k "
            "trajectories, 1.77 GB at 7B)."
        },
    )

    # Defaults that differ from GRPOConfig
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "Reward scaling of the advantage: 'none' (ExGRPO default: reward - group mean), 'group' or "
            "'batch'."
        },
    )
    loss_type: str = field(
        default="dr_grpo",
        metadata={
            "help": "Aggregation of the per-token loss: 'dr_grpo' (ExGRPO default: token sum divided by "
            "batch * max_completion_length), 'dapo', 'bnpo' or 'grpo'.",
            "choices": list(SUPPORTED_LOSS_TYPES),
        },
    )

    def __post_init__(self):
        super().__post_init__()

        if not 0.0 <= self.replay_ratio <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {self.replay_ratio}. The paper uses 0.5.")
        if not 0.0 <= self.delayed_start_threshold <= 1.0:
            raise ValueError(
                f"delayed_start_threshold must be in [0, 1] (an accuracy), got {self.delayed_start_threshold}. The "
                "paper uses 0.35."
            )
        if not 0.0 < self.replay_weight_shaping < math.inf:
            raise ValueError(
                f"replay_weight_shaping must be > 0, got {self.replay_weight_shaping}. The paper uses 0.1."
            )
        if not 0.0 < self.bucket_width < math.inf:
            raise ValueError(f"bucket_width must be > 0 (success counts), got {self.bucket_width}. The paper uses 1.")
        if self.bucket_center is not None and not 0.0 <= self.bucket_center <= self.num_generations:
            raise ValueError(
                f"bucket_center must be between 0 and num_generations ({self.num_generations}) success counts, got "
                f"{self.bucket_center}. Set it to None for num_generations / 2, as the paper."
            )
        if self.question_selection not in QUESTION_SELECTIONS:
            raise ValueError(
                f"question_selection must be one of {list(QUESTION_SELECTIONS)}, got {self.question_selection!r}."
            )
        if self.displaced_questions not in DISPLACED_QUESTIONS:
            raise ValueError(
                f"displaced_questions must be one of {list(DISPLACED_QUESTIONS)}, got {self.displaced_questions!r}."
            )
        if not (isinstance(self.success_threshold, (int, float)) and 0.0 <= self.success_threshold < math.inf):
            raise ValueError(
                f"success_threshold must be a finite number >= 0 (a completion is a success when its reward reaches "
                f"it), got {self.success_threshold}. The paper's 0/1 reward uses 1.0."
            )
        if self.trajectory_selection not in TRAJECTORY_SELECTIONS:
            raise ValueError(
                f"trajectory_selection must be one of {list(TRAJECTORY_SELECTIONS)}, got "
                f"{self.trajectory_selection!r}."
            )
        for name in ("max_trajectories_per_question", "max_buffer_trajectories"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None (unbounded) or at least 1, got {value}.")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"ExGRPO supports loss_type in {list(SUPPORTED_LOSS_TYPES)}, got {self.loss_type!r}. Set "
                "loss_type='dr_grpo' (the paper's aggregation)."
            )
        if self.use_adaptive_entropy:
            raise ValueError(
                "ExGRPO does not support use_adaptive_entropy. Set use_adaptive_entropy=False; a static entropy_coef "
                "is supported."
            )
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                f"ExGRPO does not support top_entropy_quantile < 1 (got {self.top_entropy_quantile}): the replayed "
                "tokens would be masked by a quantile of the fresh ones. Set top_entropy_quantile=1.0."
            )
        if self.off_policy_mask_threshold is not None:
            raise ValueError(
                "ExGRPO does not support off_policy_mask_threshold: replayed trajectories are off-policy by design and "
                "are handled by the shaped weight. Set off_policy_mask_threshold=None."
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"ExGRPO's importance weights are per token; got importance_sampling_level="
                f"{self.importance_sampling_level!r}. Set importance_sampling_level='token'."
            )
        if self.delta is not None:
            raise ValueError(
                "ExGRPO does not support two-sided clipping (delta). Set delta=None; fresh tokens use the usual "
                "clipping with epsilon / epsilon_high (or none after the switch, see unclip_fresh_after_switch)."
            )
        local_generation_batch = self.per_device_train_batch_size * self.steps_per_generation
        if local_generation_batch % self.num_generations != 0:
            raise ValueError(
                f"The per-device generation batch (per_device_train_batch_size * steps_per_generation = "
                f"{self.per_device_train_batch_size} * {self.steps_per_generation} = {local_generation_batch}) must be "
                f"a multiple of num_generations ({self.num_generations}), otherwise a group would be split across "
                "processes and ExGRPO could not replace whole groups. Change per_device_train_batch_size, "
                "steps_per_generation (or gradient_accumulation_steps) or num_generations."
            )
