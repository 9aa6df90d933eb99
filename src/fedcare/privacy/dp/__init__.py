"""Record-level differential privacy: accounting and the site's privacy ledger.

:func:`epsilon_spent` composes :class:`Mechanism` releases with a maintained
accountant (Opacus PRV or RDP, dp-accounting PLD; see :data:`ACCOUNTANTS`),
:func:`noise_multiplier_for` finds the noise that fits a budget, and
:class:`PrivacyLedger` keeps what a site has spent on a dataset, on disk,
refusing work that would exceed its budget. The accountants' libraries are
imported only when an epsilon is computed.
"""

from fedcare.privacy.dp.accountant import ACCOUNTANTS, Mechanism, epsilon_spent, noise_multiplier_for
from fedcare.privacy.dp.ledger import LedgerEntry, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "LedgerEntry",
    "Mechanism",
    "PrivacyLedger",
    "epsilon_spent",
    "noise_multiplier_for",
]
