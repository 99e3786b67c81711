"""Runs a federated experiment from a config file.

  python launch.py                                  # the default: MiniLM + adapters, FedAvg
  python launch.py --config configs/digits.py:tiny --config.rounds=3 --workdir runs/x
  python launch.py --config configs/digits.py:tiny --config.rounds=6 --workdir runs/x --resume
  # multi-host: the same command on every host (README, "Running on clusters")
  python launch.py --distributed --workdir /shared/runs/x          # under srun / mpirun / a TPU pod
  python launch.py --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0 --workdir ...

Flags around `fedjax_fm.experiment.run`, which builds the data, model and algorithm of the config
by lookup in its tables and calls `fedjax_fm.train`. Every failure a user can cause ends in one
line on stderr naming the problem and the fix, never a traceback: configuration mistakes (exit
status 1, before anything in the workdir is touched), an unusable workdir, a checkpoint to resume
from that is missing or damaged (1); a run whose training diverged (2, its good checkpoints
kept); an interrupt (130; --resume continues). A traceback means a bug in fedjax_fm.
"""

import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

# Light imports only up here: flag, config-file and workdir mistakes are reported in well under
# a second; jax and the rest of fedjax_fm are imported once the arguments are known to be good.
from fedjax_fm import rundir

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "default.py"),
                                "Experiment config file (path[:variant]).")
flags.DEFINE_string("workdir", None, "Where metrics, curves, checkpoints and the config go "
                    "(default: runs/<config>-<date>-<time>).")
flags.DEFINE_string("compilation_cache",
                    os.environ.get("FEDJAX_FM_COMPILATION_CACHE", "~/.cache/fedjax_fm/jax"),
                    "Persistent XLA compilation cache folder, so a second launch of the same "
                    "config skips compiling ('' turns it off; $FEDJAX_FM_COMPILATION_CACHE sets "
                    "the default).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Start anew in a --workdir that holds a run (the old run "
                  "is moved to <workdir>/replaced-<time>/, not deleted).")
flags.DEFINE_bool("allow_config_change", False, "Let --resume continue with a different config.")
flags.DEFINE_bool("fallback_checkpoint", False, "If the last checkpoint is damaged, resume from "
                  "the one before it.")
flags.DEFINE_bool("distributed", False, "Multi-host run: initialise jax.distributed from the "
                  "SLURM, Open MPI or Cloud TPU pod environment (one process per task / rank / "
                  "TPU VM worker).")
flags.DEFINE_string("coordinator", None, "Multi-host run with explicit settings: host:port of "
                    "process 0 (needs --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-host run: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host run: this process's index, 0 .. "
                     "num_processes - 1 (process 0 writes metrics and plots).")
FLAGS = flags.FLAGS


def default_workdir(config_path: str, now: float | None = None) -> str:
  """``runs/<config>[-<argument>]-<date>-<time>``: where a run without --workdir goes."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg.replace(',', '-')}" if arg else "")
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")


def fail(message: str, status: int = 1):
  """Ends the process with `message` as one line on stderr and exit `status`.

  Whatever orbax, TensorStore or asyncio would print while the interpreter shuts down after a
  failed restore (pending futures' errors, tens of lines) goes to /dev/null: the one line is
  the whole report."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  sys.stderr = open(os.devnull, "w")  # pylint: disable=consider-using-with
  sys.exit(status)


def _last_line(text: str) -> str:
  """The exception line at the end of a message that embeds a traceback (ml_collections puts
  one inside the flag error of a config file that raises), without its type."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  last = lines[-1] if lines else ""
  head, sep, rest = last.partition(": ")
  return rest if sep and head.replace(".", "").isidentifier() and head[0].isupper() else last


def parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line instead of a traceback."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # a config file that cannot be read fails here, not later
    return argv
  except OSError:  # the config file is missing or unreadable
    fail(f"cannot read the config file {config_flags.get_config_filename(FLAGS['config'])!r}; "
         "check the path after --config (path[:argument])")
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # a config file whose get_config raised: its own message
      flag = text.split(": ", 1)[0].removeprefix("flag ")
      fail(f"{flag}: {_last_line(text)}")
    fail(text)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that's absent
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    inner = e.args[0] if e.args else e   # AttributeError(KeyError("'key'\nDid you mean ..."))
    inner = inner.args[0] if isinstance(inner, KeyError) and inner.args else inner
    lines = str(inner).strip(chr(34)).splitlines() or [""]
    guess = re.search(r'Did you mean "([^"]+)"', " ".join(lines[1:]))
    hint = f'; did you mean "{guess.group(1)}"?' if guess else ""
    fail(f"unknown config key {lines[0]} in {bad}{hint}; check the spelling against the "
         "config file")
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    fail(f"the config file failed to load: {type(e).__name__}: {_last_line(e)}")


def user_error(e: BaseException) -> tuple[str, int] | None:
  """(one-line message, exit status) for a failure the user caused, None for anything else (a
  bug in fedjax_fm, whose traceback is kept).

  Status 1: a configuration, data, workdir or checkpoint problem; 2: training diverged (the
  good checkpoints are kept); 130: interrupted."""
  if isinstance(e, KeyboardInterrupt):
    return "interrupted; --resume continues from the last checkpoint", 130
  if not isinstance(e, Exception):
    return None
  # Looked up, not imported: an error raised before fedjax_fm's heavy modules were loaded is
  # none of theirs, and reporting it should not wait for jax to import.
  train, checkpoint = (sys.modules.get(f"fedjax_fm.{m}") for m in ("train", "checkpoint"))
  if train and isinstance(e, train.TrainingDiverged):
    return str(e), 2
  if isinstance(e, ValueError) or (checkpoint and isinstance(e, checkpoint.CheckpointError)):
    # configuration and input mistakes: nothing already written is lost
    return str(e), 1
  if isinstance(e, OSError):
    if e.errno is None:  # fedjax_fm's own message (missing data files name their fetch command)
      return str(e), 1
    # a path the process cannot use (permissions, a full disk, a file where a folder should be)
    return (f"{e.strerror}: {e.filename!r}; check that --workdir can be written and the data "
            "paths read"), 1
  return None


def _run():
  workdir = FLAGS.workdir
  if workdir is None and not (FLAGS.resume or FLAGS.distributed or FLAGS.coordinator):
    workdir = default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  if workdir:
    rundir.check_writable(workdir)  # before the heavy imports: an unusable workdir fails fast
  import jax  # pylint: disable=import-outside-toplevel
  from fedjax_fm import distributed  # pylint: disable=import-outside-toplevel
  from fedjax_fm.experiment import run  # pylint: disable=import-outside-toplevel
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    # Every program, not only those over jax's default 1 s: a launch compiles dozens of small
    # ones (init, evaluation, metrics) that together cost more than the round (BENCHMARKS.md,
    # "Compile time"). $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still wins.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # Before anything touches a device: a multi-host run joins its processes first.
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                         from_environment=FLAGS.distributed)
  if workdir and distributed.is_main():
    print(f"results: {workdir}", flush=True)
  run(FLAGS.config, workdir, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
      allow_config_change=FLAGS.allow_config_change,
      fallback_checkpoint=FLAGS.fallback_checkpoint)
  if workdir and distributed.is_main():
    print(f"results: {workdir} (metrics.jsonl, curves.png, summary.txt, tensorboard/, "
          "checkpoints/)", flush=True)


def _unraisable(hook):
  """`sys.unraisablehook` without the one known-harmless message: after a failed checkpoint
  read, TensorStore completes orbax's futures on an event loop orbax has already closed, and each
  prints a traceback ("Event loop is closed") in the middle of a one-line error."""
  def filtered(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  return filtered


def main(argv):
  del argv
  sys.unraisablehook = _unraisable(sys.unraisablehook)
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  try:
    _run()
  except BaseException as e:  # pylint: disable=broad-except
    report = user_error(e)
    if report is None:
      raise
    fail(*report)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
