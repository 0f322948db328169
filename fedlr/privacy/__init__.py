"""Privacy mechanisms: client-side DP-SGD on Opacus with cumulative per-client accounting.

FedSVD's DP setting (Lee et al., NeurIPS 2025, arXiv 2505.12805;
``shared/specs/fedsvd.md`` §3): example-level DP per client against an
untrusted server, noise calibrated once for the whole run.
"""

from fedlr.privacy.dpsgd import (
    ACCOUNTANTS,
    BudgetExceededError,
    ClientAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
    dp_local_sgd,
    dp_steps,
    sample_rate,
)

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
