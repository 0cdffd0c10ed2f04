"""FlowRL and ExGRPO for Hugging Face TRL: drop-in `GRPOTrainer` subclasses for LLM reasoning."""

from ._compat import check_trl_version


check_trl_version()

from .exgrpo import ExGRPOConfig, ExGRPOTrainer, ReplayBuffer  # noqa: E402
from .flowrl import FlowRLConfig, FlowRLTrainer, trajectory_balance_loss  # noqa: E402


__version__ = "0.1.0"

__all__ = [
    "ExGRPOConfig",
    "ExGRPOTrainer",
    "FlowRLConfig",
    "FlowRLTrainer",
    "ReplayBuffer",
    "trajectory_balance_loss",
]
