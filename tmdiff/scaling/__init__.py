"""tmdiff.scaling."""
