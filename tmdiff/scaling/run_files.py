"""The files a sweep writes into each run directory (tmdiff.scaling.sweep) and that
tmdiff.scaling.collect reads back."""
RUN_FILE = "sweep_run.json"   # the run's sweep record: name, tags, command
CONFIG_FILE = "config.json"   # the run's resolved config
