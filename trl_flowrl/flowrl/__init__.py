from .flowrl_config import FlowRLConfig
from .flowrl_trainer import FlowRLTrainer
from .log_z import LogZHead
from .objective import TrajectoryBalanceTerms, trajectory_balance_loss, trajectory_balance_terms


__all__ = [
    "FlowRLConfig",
    "FlowRLTrainer",
    "LogZHead",
    "TrajectoryBalanceTerms",
    "trajectory_balance_loss",
    "trajectory_balance_terms",
]
