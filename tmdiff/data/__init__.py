"""tmdiff.data."""
