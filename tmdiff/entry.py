"""What every tmdiff command shares: library chatter kept out of the log, and user errors as one
line (exit status 2) rather than a traceback. `--verbosity=1` brings both back."""
from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

# INFO lines from these packages (checkpoint-manager dumps, backend probing) stay out of the log.
QUIET_LIBRARIES = ("/orbax/", "/jax/_src/", "/jaxlib/", "/grain/", "/etils/")
USAGE_ERROR = 2


class _LibraryInfoFilter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    return record.levelno >= logging.WARNING or not any(p in path for p in QUIET_LIBRARIES)


_FILTER = _LibraryInfoFilter()


def verbose(argv=None) -> bool:
  """True when --verbosity (or -v) >= 1 was asked for."""
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbosity >= 1
  for arg in argv or sys.argv:
    m = re.fullmatch(r"--?(?:v|verbosity)=(-?\d+)", arg)
    if m and int(m.group(1)) >= 1:
      return True
  return False


def quiet_library_logs() -> None:
  """Drops library INFO records (not WARNING and above) from the log, unless verbose."""
  if verbose():
    return
  for handler in (absl_logging.get_absl_handler(), *logging.getLogger().handlers):
    if _FILTER not in handler.filters:
      handler.addFilter(_FILTER)


def message(e: BaseException) -> str:
  """The error's text on one line; ml_collections wraps a KeyError in an AttributeError."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def error_line(prog: str, e: BaseException, hint: str = "") -> str:
  """What a user error prints: one line."""
  return f"{prog}: {type(e).__name__}: {message(e)}{hint}"


def fail(prog: str, e: BaseException, hint: str = "") -> None:
  print(error_line(prog, e, hint), file=sys.stderr)
  sys.exit(USAGE_ERROR)


def parse_error_hint(e: BaseException, argv) -> str:
  """Where to look after a failed flag parse: --helpfull for a flag error; for a
  --config.key=value the config does not accept, that argument."""
  if isinstance(e, flags.Error):
    return " (see --helpfull)"
  text = message(e)
  quoted = re.match(r"'([^']+)'", text)  # ml_collections: 'stepz'; Did you mean "steps"...
  overrides = {a: a.split("=", 1)[0].split(".", 1)[1] for a in argv[1:] if re.match(r"--?\w+\.", a)}
  culprit = ([a for a, key in overrides.items()
              if quoted and re.search(rf"(^|\.){re.escape(quoted[1])}\b", key)]
             or [a for a, key in overrides.items() if key in text]
             or [a for a, key in overrides.items()
                 if re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", text)]
             or (list(overrides) if len(overrides) == 1 else []))
  return f" (in {culprit[0]})" if culprit else ""


def run_app(main, prog: str, user_errors: tuple = ()) -> None:
  """absl's app.run, with flag and config-override errors and `user_errors` as one line."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # a flag or a --config.key=value the config does not accept
      if verbose(argv):
        raise
      fail(prog, e, parse_error_hint(e, argv))

  def guarded(argv):
    quiet_library_logs()
    try:
      return main(argv)
    except user_errors as e:
      if verbose():
        raise
      fail(prog, e)

  app.run(guarded, flags_parser=parse)


class ConfigFileError(Exception):
  pass


def config_value(holder, flag: str = "config"):
  """The value of an ml_collections config-file flag; a file that cannot be loaded is a
  ConfigFileError naming it."""
  try:
    value = holder.value
    value.keys  # ml_collections defers a load failure to the first attribute read
    return value
  except OSError as e:
    from ml_collections import config_flags
    path = config_flags.get_config_filename(flags.FLAGS[flag])
    reason = str(e).strip().splitlines()[-1].strip()
    raise ConfigFileError(f"--{flag}={path}: cannot load it ({reason})") from None
