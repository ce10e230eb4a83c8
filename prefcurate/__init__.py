"""prefcurate: build and curate synthetic preference datasets (prompt, chosen, rejected)."""

__version__ = "0.1.0"
