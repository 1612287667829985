"""tmdiff.configs."""
