"""mcdrop: Monte Carlo dropout uncertainty service."""

__version__ = "0.1.0"
