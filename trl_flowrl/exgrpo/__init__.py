"""ExGRPO (arXiv 2510.02245): GRPO with a replay buffer of past successes, as a `trl.GRPOTrainer` subclass."""

from .exgrpo_config import ExGRPOConfig
from .exgrpo_trainer import ExGRPOTrainer
from .objective import aggregate_loss, exgrpo_per_token_loss
from .replay_buffer import ReplayBuffer, Trajectory, bucket_weight, select_trajectory


__all__ = [
    "ExGRPOConfig",
    "ExGRPOTrainer",
    "ReplayBuffer",
    "Trajectory",
    "aggregate_loss",
    "bucket_weight",
    "exgrpo_per_token_loss",
    "select_trajectory",
]
