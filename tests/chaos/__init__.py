"""Chaos tests' helpers: operation histories, the checker that judges them, a dropping proxy."""
