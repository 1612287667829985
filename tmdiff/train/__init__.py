"""tmdiff.train."""
