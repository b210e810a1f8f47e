"""edgekit: export, rewrite, compile and profile models for edge devices."""

__version__ = "0.1.0"
