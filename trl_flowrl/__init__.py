"""FlowRL and ExGRPO for Hugging Face TRL: drop-in `GRPOTrainer` subclasses for LLM reasoning."""

from ._compat import check_trl_version


check_trl_version()

from .flowrl import FlowRLConfig, FlowRLTrainer, trajectory_balance_loss  # noqa: E402


__version__ = "0.1.0"

__all__ = ["FlowRLConfig", "FlowRLTrainer", "trajectory_balance_loss"]
