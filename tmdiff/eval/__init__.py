"""tmdiff.eval."""
