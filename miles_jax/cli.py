"""Shared command-line plumbing for the `python -m miles_jax.*` entry points."""
from __future__ import annotations

import os
import sys
from typing import Callable


def setup_process() -> None:
  """The process set-up of every `python -m miles_jax.*` command, called before TensorFlow /
  jaxlib load (at the top of each command module, and again by `run`; idempotent): the C++
  start-up log filter (console.install), the platform choice on a TPU-less host with libtpu,
  and the gs:// path settings (paths.configure). Importing miles_jax does none of these."""
  from miles_jax import allocator, console, paths
  console.install()
  # libtpu on a host without TPU chips (the `[tpu]` extra installed for `plan`): JAX would start
  # the TPU runtime first, which prints warnings, then use the CPU anyway; go to the CPU directly.
  if not os.environ.get("JAX_PLATFORMS") and "jax" not in sys.modules:
    if allocator.libtpu_without_tpu():
      os.environ["JAX_PLATFORMS"] = "cpu"
  paths.configure()


def run(main: Callable[[list[str]], int | None]) -> None:
  """absl's app.run, except that --help exits 0 (absl exits 1), main's int is the exit code and
  positional arguments (a typo like `--config foo.py bar`) exit 2 naming them.

  Flags are spelled with underscores (`--num_shards`); the dashed spelling (`--num-shards`) is
  accepted as an alias. `--verbose` (or MILES_JAX_VERBOSE=1) keeps the C++ start-up logs and
  absl/orbax INFO lines that are hidden by default (see miles_jax/console.py)."""
  setup_process()
  from absl import app, flags

  from miles_jax import console
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show library logs: TensorFlow/XLA C++ start-up lines and "
                      "absl/orbax INFO (same as MILES_JAX_VERBOSE=1).",
                      module_name=sys.argv[0])  # listed with the command's own flags in --help
  sys.argv[1:] = underscored(sys.argv[1:], flags.FLAGS)
  asked_help = any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in sys.argv[1:])
  # orbax and absl log every checkpoint step at INFO; show warnings unless asked (-v / --verbosity).
  if not console.verbose() and not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    sys.argv.insert(1, "--verbosity=-1")
  started = []

  def run_main(argv):
    started.append(True)
    if len(argv) > 1:  # every command takes flags only
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(2)
    sys.exit(main(argv) or 0)

  try:
    app.run(run_main)
  except SystemExit as e:
    if asked_help and e.code == 1:
      sys.exit(0)
    if not started and e.code == 1:  # absl's answer to a bad or unknown flag: bad input
      sys.exit(2)
    raise
  except (AttributeError, KeyError) as e:
    if started:  # raised by main itself: a bug, keep the traceback
      raise
    _unknown_field(e)


def underscored(args: list[str], flag_values) -> list[str]:
  """`--num-shards=8` / `--num-shards 8` -> `--num_shards...` for flags defined with underscores
  (also `--no-flag` -> `--noflag` for booleans); everything after a bare `--` is left alone."""
  out = list(args)
  for i, a in enumerate(out):
    if a == "--":
      break
    if not a.startswith("--") or "-" not in a[2:].split("=", 1)[0]:
      continue
    name, eq, value = a[2:].partition("=")
    alt = name.replace("-", "_")
    if alt in flag_values:
      out[i] = f"--{alt}{eq}{value}"
    elif alt.startswith("no_") and alt[3:] in flag_values:
      out[i] = f"--no{alt[3:]}{eq}{value}"
  return out


def parse(define: Callable, argv: list[str], prog: str):
  """Parses `argv` (no program name) into fresh FlagValues holding the flags `define(fv)` adds:
  the in-process form of a command, e.g. `prepare.main([...])` from a script or a test.
  A bad or missing flag prints `error: ...` and exits 2."""
  from absl import flags
  fv = flags.FlagValues()
  define(fv)
  try:
    rest = fv([prog] + underscored([str(a) for a in argv], fv))
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
    sys.exit(2)
  return fv


def flag_command(define: Callable, body: Callable, prog: str):
  """(main, cli) of a command whose flags `define(fv)` adds and whose work is `body(flags)`:
  `main(["--out=...", ...])` runs it in-process (a script, a test), `cli()` is `python -m`."""
  def main(argv: list) -> int:
    return body(parse(define, argv, prog))

  def cli():
    from absl import flags
    define(flags.FLAGS)

    run(lambda argv: body(flags.FLAGS))
  return main, cli


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
