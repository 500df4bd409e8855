"""Shared command-line plumbing for the `python -m miles_jax.*` entry points."""
from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[list[str]], int | None]) -> None:
  """absl's app.run, except that --help exits 0 (absl exits 1) and main's int is the exit code."""
  from absl import app

  asked_help = any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in sys.argv[1:])
  # orbax and absl log every checkpoint step at INFO; show warnings unless asked (-v / --verbosity).
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    sys.argv.insert(1, "--verbosity=-1")
  started = []

  def run_main(argv):
    started.append(True)
    sys.exit(main(argv) or 0)

  try:
    app.run(run_main)
  except SystemExit as e:
    if asked_help and e.code == 1:
      sys.exit(0)
    raise
  except (AttributeError, KeyError) as e:
    if started:  # raised by main itself: a bug, keep the traceback
      raise
    _unknown_field(e)


def _unknown_field(e: BaseException):
  """ml_collections' answer to --config.no.such.field=... as one line (with its "Did you mean")."""
  detail = e
  while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(msg))
    detail = detail.args[0]
  detail = " ".join(str(detail).replace("\\'", "'").replace("\\n", "\n").split())
  print(f"error: unknown config field: {detail}", file=sys.stderr)
  sys.exit(2)


def define_config_file(name: str, default: str | None, help_string: str):
  """config_flags.DEFINE_config_file (locked). With a default file, ml_collections applies the
  --config.* overrides while the flag is defined, so an unknown field is reported here."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_field(e)
