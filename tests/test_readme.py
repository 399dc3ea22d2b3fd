"""README's commands stay in sync with CI and the flagfiles document themselves."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
  with open(os.path.join(ROOT, *parts)) as f:
    return f.read()


def test_ci_runs_exactly_the_readme_test_command():
  blocks = re.findall(r"```bash\n(.*?)\n```", _read("README.md"), re.S)
  assert len(blocks) >= 2
  search, tests = blocks[0], blocks[1]
  assert "tfnas-search --flagfile=flags/darts_digits.cfg" in search
  pytest_cmd = tests.split("&&")[-1].strip()
  assert pytest_cmd.startswith("python -m pytest")
  ci_lines = [l.strip() for l in _read(".ci", "run").splitlines()
              if l.strip() and not l.startswith("#")]
  assert ci_lines[-1] == pytest_cmd


def test_every_flagfile_starts_with_its_command():
  for name in sorted(os.listdir(os.path.join(ROOT, "flags"))):
    text = _read("flags", name)
    assert text.startswith("#"), name
    header = text.split("\n--")[0]
    if "common" not in name:
      assert f"flags/{name}" in header, name
      assert "Runtime" in header or "runtime" in header, name
