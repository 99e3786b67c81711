"""Every `python launch.py` command of the README runs as written, in its tiny form: the config's
``tiny`` variant, the workdir under a temporary folder. Cluster commands (srun, gcloud,
--coordinator, --distributed) need several hosts and are left to `tests/test_multihost.py`.
Each run's workdir is checked as `tests/tiny.py` checks the builders' tiny runs, so the default
and digits configs' tiny variants are tested here and not again in test_experiment.py."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = ("--distributed", "--coordinator", "srun ", "gcloud ")


def readme_commands():
  """The README's `python launch.py` lines of ```bash blocks, joined across backslashes."""
  text = open(os.path.join(ROOT, "README.md")).read()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if "python launch.py" in line and not any(c in line for c in CLUSTER):
        out.append(line[line.index("python launch.py"):] if "&&" in line else line)
  return out


def tiny_form(command, tmp):
  """(argv, env): the command with the config's tiny variant and its workdir under `tmp`."""
  words = shlex.split(command)
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  if "XLA_FLAGS" in env:  # the command's flags, and the tests' (conftest.py) it does not set
    env["XLA_FLAGS"] = " ".join([env["XLA_FLAGS"]] + [
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if f.split("=")[0] not in env["XLA_FLAGS"]])
  assert words[:2] == ["python", "launch.py"], command
  args = words[2:]
  if "--config" not in args:
    args = ["--config", "configs/default.py"] + args
  i = args.index("--config") + 1
  path, _, variant = args[i].partition(":")
  parts = [p for p in variant.split(",") if p]
  variant = ",".join(["tiny"] + [p for p in parts if p != "tiny"])
  args[i] = f"{os.path.join(ROOT, path)}:{variant}"
  if "--workdir" in args:
    j = args.index("--workdir") + 1
    args[j] = os.path.join(tmp, args[j])
  return [sys.executable, os.path.join(ROOT, "launch.py")] + args, env


def test_the_readme_python_example_runs(capsys):
  text = open(os.path.join(ROOT, "README.md")).read()
  (example,) = re.findall(r"```python\n(.*?)```", text, re.S)
  exec(compile(example, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert "round 30: train loss" in capsys.readouterr().out


def test_the_readme_has_the_commands_a_newcomer_needs():
  commands = readme_commands()
  assert any(c == "python launch.py" for c in commands)            # the default experiment
  assert any("--resume" in c for c in commands)
  assert len(commands) >= 6


def test_every_readme_command_runs_as_written(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = set()
  for command in readme_commands():
    argv, extra = tiny_form(command, str(tmp_path))
    # Commands whose tiny forms differ only in the workdir (the README's GPU line is the
    # default experiment again) run once.
    key = tuple(a for a in argv if a != "--workdir" and not a.startswith(str(tmp_path)))
    if key in done and "--resume" not in argv:
      continue
    done.add(key)
    proc = subprocess.run(argv, cwd=str(tmp_path), env={**env, **extra}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert "results: " in proc.stdout, command
    assert "the round compiled" not in proc.stderr, command  # every round compiled once
    if "--workdir" in argv:
      workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
    else:  # the default experiment without --workdir goes to a workdir it names
      (name,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("default-tiny-")]
      workdir = tmp_path / "runs" / name
    rounds = json.loads((workdir / "config.json").read_text())["rounds"]
    tiny.check_outputs(workdir, rounds)
