"""Runs a federated experiment from a config file.

  python launch.py                                  # the default: MiniLM + adapters, FedAvg
  python launch.py --config configs/digits.py:tiny --config.rounds=3 --workdir runs/x
  python launch.py --config configs/digits.py:tiny --config.rounds=6 --workdir runs/x --resume
  # multi-host: the same command on every host (README, "Running on clusters")
  python launch.py --distributed --workdir /shared/runs/x          # under srun / mpirun / a TPU pod
  python launch.py --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0 --workdir ...

Flags around `fedjax_fm.experiment.run`, which builds the data, model and algorithm of the config
by lookup in its tables and calls `fedjax_fm.train`. Configuration mistakes end in one line
naming the problem and the fix, with exit status 1, before anything in the workdir is touched.
"""

import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_fm import distributed
from fedjax_fm.checkpoint import CheckpointError
from fedjax_fm.experiment import run

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


def parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that's absent
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key {str(e).strip(chr(34))} in {bad}; check the spelling "
             "against the config file")
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    sys.exit(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  try:
    # Before anything touches a device: a multi-host run joins its processes first.
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                           from_environment=FLAGS.distributed)
    workdir = FLAGS.workdir
    if workdir is None and not (FLAGS.resume or FLAGS.distributed or FLAGS.coordinator):
      workdir = default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    if workdir and distributed.is_main():
      print(f"results: {workdir}", flush=True)
    run(FLAGS.config, workdir, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
        allow_config_change=FLAGS.allow_config_change,
        fallback_checkpoint=FLAGS.fallback_checkpoint)
    if workdir and distributed.is_main():
      print(f"results: {workdir} (metrics.jsonl, curves.png, summary.txt, tensorboard/, "
            "checkpoints/)", flush=True)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    # configuration and input mistakes: one line, non-zero exit, nothing already written lost
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
