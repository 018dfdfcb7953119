"""ECE: explainable and efficient knowledge editing, as a reproducible DVC pipeline."""

__version__ = "0.1.0"
