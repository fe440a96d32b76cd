"""The demo's golden scenarios (``zerver golden check`` runs these by default)."""

from ._scenarios import SCENARIOS

__all__ = ["SCENARIOS"]
