"""tmdiff.model."""
