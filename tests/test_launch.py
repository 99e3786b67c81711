"""The launcher (`launch.py`): flags around `fedjax_fm.experiment.run`. Mistakes end in one line
and a non-zero exit; a run without --workdir goes to a workdir it names."""

import os
import subprocess
import sys

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, cwd=ROOT, **env):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=300,
                        env={**os.environ, **env})


def test_bad_config_exits_nonzero_with_one_line():
  proc = _launch("--config", os.path.join(ROOT, "configs", "digits.py:tiny"),
                 "--config.algorithm.name=fedsgd")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown algorithm 'fedsgd'")
  assert "Traceback" not in proc.stderr


def test_unknown_config_key_is_one_line_not_a_traceback():
  proc = _launch("--config", os.path.join(ROOT, "configs", "digits.py:tiny"),
                 "--config.learning_rate=0.1")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: unknown config key 'learning_rate' in ['--config.learning_rate=0.1']; check the "
      "spelling against the config file"]


def test_missing_data_files_name_the_fetch_command(tmp_path):
  proc = _launch("--config", os.path.join(ROOT, "configs", "default.py:tiny"), "--workdir",
                 str(tmp_path / "run"), FEDJAX_FM_CACHE=str(tmp_path / "empty"))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "not in the cache" in lines[0], proc.stderr[-800:]
  assert "-m fedjax_fm.assets" in lines[0]
  assert not (tmp_path / "run").exists()


def test_default_workdir_is_named_after_the_config_and_the_time():
  when = 1796300000.0
  stamp = __import__("time").strftime("%Y%m%d-%H%M%S", __import__("time").localtime(when))
  assert launch.default_workdir("/x/configs/digits.py", when) == f"runs/digits-{stamp}"
  assert launch.default_workdir("configs/digits.py:tiny,fedper", when) == \
      f"runs/digits-tiny-fedper-{stamp}"
