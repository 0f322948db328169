"""Privacy mechanisms: client-side DP-SGD on Opacus with cumulative per-client accounting.

FedSVD's DP setting (Lee et al., NeurIPS 2025, arXiv 2505.12805;
``shared/specs/fedsvd.md`` §3): example-level DP per client against an
untrusted server, noise calibrated once for the whole run.
"""

from typing import Any

# Opacus takes seconds to import; load it only when DP-SGD is used (not for the
# LDP release every client imports, and not in every Ray actor).
__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "ClientAccountant",
    "PrivacyBudget",
    "calibrate_noise_multiplier",
    "dp_local_sgd",
    "dp_steps",
    "sample_rate",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedlr.privacy import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module 'fedlr.privacy' has no attribute {name!r}")
