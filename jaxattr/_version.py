"""Library version, recorded in every sketch."""

__version__ = "0.1.0"
