"""trainfleet: train each model of a research project exactly once across a fleet."""

__version__ = "0.1.0"
