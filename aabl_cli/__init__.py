"""aabl: clean poisoned image-classification training sets and train robust models (A-ABL)."""

__version__ = "0.1.0"
