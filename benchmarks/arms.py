"""The arms that benchmarks 2, 3 and 4 compare on the embedded arithmetic task.

An arm is a trainer of `TRAINER_NAMES` (GRPO, FlowRL or ExGRPO) run with exactly the settings of the recipes' embedded
config (`recipes/configs/embedded/<trainer>_arithmetic.yaml`) plus the arm's own command-line overrides (e.g.
`--beta 0.0667` for GRPO with a KL term), and how tables and plots name it. `ARMS` holds them by name; `LABELS` and
`COLORS` are their names and colours in tables and plots. `runs.tracked_run` trains one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


TRAINER_NAMES = ("grpo", "flowrl", "exgrpo")


@dataclass(frozen=True)
class Arm:
    """One configuration the benchmarks compare: a trainer of `TRAINER_NAMES`, the command-line overrides it adds to
    that trainer's embedded recipe, and how tables and plots name it.

    `expect` lists the resolved settings the arm stands for; a run checks them after parsing, so that a change of the
    embedded recipe (e.g. its FlowRL objective) cannot silently change what an arm measures.
    """

    trainer: str
    overrides: tuple[str, ...]
    label: str
    color: str
    expect: Mapping[str, object] = field(default_factory=dict)


# The resolved FlowRL settings of each objective, as the arms below stand for them.
OFFICIAL = {
    "objective": "official",
    "residual_normalization": "token_mean",
    "reward_in_residual": "advantage",
    "log_z_estimate": "head",
}
MATCHING = {
    "objective": "matching",
    "residual_normalization": "sum",
    "reward_in_residual": "reward",
    "log_z_estimate": "group",
}
# ExGRPO at the paper's defaults, which the ExGRPO arms change one at a time.
PAPER_EXGRPO = {
    "replay_ratio": 0.5,
    "replay_policy_shaping": True,
    "replay_importance_correction": True,
    "question_selection": "gaussian",
    "trajectory_selection": "lowest_entropy",
    "displaced_questions": "drop",
}
# GRPO + KL: with the advantage as reward term and beta = 15, the official FlowRL objective's per-sample gradient is
# GRPO's plus a squared log-ratio pull toward the reference of weight about 1/beta, so GRPO with a KL coefficient of
# 1/15 is its fair baseline (TRL's default KL estimator, use_bias_correction_kl and loss_type unchanged).
# The FlowRL arms name their objective and beta, so that they do not depend on what the embedded recipe uses.
ARMS = {
    "grpo": Arm("grpo", (), "GRPO", "tab:blue", {"beta": 0.0}),
    "grpo_kl": Arm("grpo", ("--beta", "0.0667"), "GRPO + KL (beta 1/15)", "tab:cyan", {"beta": 0.0667}),
    "flowrl": Arm(
        "flowrl",
        ("--objective", "official", "--beta", "15"),
        "FlowRL official (beta 15)",
        "tab:orange",
        {**OFFICIAL, "beta": 15.0},
    ),
    "flowrl_matching": Arm(
        "flowrl",
        ("--objective", "matching", "--beta", "15"),
        "FlowRL matching (beta 15)",
        "tab:red",
        {**MATCHING, "beta": 15.0},
    ),
    # the trade-off: a softer target (correct/wrong odds e^5 times the reference's), a third of the reward term's size
    "flowrl_matching_b5": Arm(
        "flowrl",
        ("--objective", "matching", "--beta", "5"),
        "FlowRL matching (beta 5)",
        "tab:purple",
        {**MATCHING, "beta": 5.0},
    ),
    # Replay of past rollouts (a departure from both papers, after TBA): half of each step's groups from the store, at
    # TBA's best share in its ablation; the store's other settings at their defaults.
    "flowrl_matching_replay": Arm(
        "flowrl",
        ("--objective", "matching", "--beta", "15", "--replay_share", "0.5"),
        "FlowRL matching + replay 0.5",
        "darkred",
        {
            **MATCHING,
            "beta": 15.0,
            "replay_share": 0.5,
            "replay_sampling": "uniform",
            "replay_importance_weight": "none",
        },
    ),
    "exgrpo": Arm("exgrpo", (), "ExGRPO", "tab:green", PAPER_EXGRPO),
    "exgrpo_no_replay": Arm(
        "exgrpo",
        ("--replay_ratio", "0.0"),
        "ExGRPO, replay_ratio 0",
        "tab:olive",
        {**PAPER_EXGRPO, "replay_ratio": 0.0},
    ),
    # The paper's ablations (its in-distribution averages on Qwen2.5-Math-7B in the labels' docs: README), and the
    # requeue departure.
    "exgrpo_no_shaping": Arm(
        "exgrpo",
        ("--replay_policy_shaping", "false"),
        "ExGRPO without policy shaping",
        "tab:brown",
        {**PAPER_EXGRPO, "replay_policy_shaping": False},
    ),
    "exgrpo_no_is": Arm(
        "exgrpo",
        ("--replay_importance_correction", "false"),
        "ExGRPO without importance correction",
        "tab:pink",
        {**PAPER_EXGRPO, "replay_importance_correction": False},
    ),
    "exgrpo_uniform_questions": Arm(
        "exgrpo",
        ("--question_selection", "uniform"),
        "ExGRPO without question selection",
        "tab:gray",
        {**PAPER_EXGRPO, "question_selection": "uniform"},
    ),
    "exgrpo_random_trajectory": Arm(
        "exgrpo",
        ("--trajectory_selection", "random"),
        "ExGRPO without trajectory selection",
        "black",
        {**PAPER_EXGRPO, "trajectory_selection": "random"},
    ),
    "exgrpo_requeue": Arm(
        "exgrpo",
        ("--displaced_questions", "requeue"),
        "ExGRPO, displaced questions requeued",
        "goldenrod",
        {**PAPER_EXGRPO, "displaced_questions": "requeue"},
    ),
}
LABELS = {name: arm.label for name, arm in ARMS.items()}
COLORS = {name: arm.color for name, arm in ARMS.items()}
