"""benchmarks/update_readme.py: result tables are copied into README.md, never typed."""
import os
import re
import shutil

from tests.helpers import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mod():
  return load_module("benchmarks/update_readme.py", "update_readme")


def test_update_readme(tmp_path):
  m = _mod()
  (tmp_path / "benchmarks" / "results").mkdir(parents=True)
  (tmp_path / "experiments" / "results").mkdir(parents=True)
  (tmp_path / "benchmarks" / "results" / "ops.md").write_text(
      "| op | ms |\n|---|---|\n| gla | 1.5 |\n\n![plot](ops.png) [web](https://x.org/a.png)\n")
  (tmp_path / "experiments" / "results" / "lolcats.md").write_text("ppl 12.3\n")
  readme = tmp_path / "README.md"
  readme.write_text("# t\n<!-- results:ops -->\nold numbers\n<!-- /results -->\ntext\n"
                    "<!-- results:lolcats -->\n<!-- /results -->\n"
                    "<!-- results:nothing_yet -->\nkeep\n<!-- /results -->\n")
  argv = ["--readme", str(readme)]
  assert m.main(argv + ["--check"]) == 1
  assert m.main(argv) == 0
  text = readme.read_text()
  assert "old numbers" not in text and "| gla | 1.5 |" in text
  assert "![plot](benchmarks/results/ops.png)" in text and "(https://x.org/a.png)" in text
  assert "ppl 12.3\n<!-- /results -->" in text
  assert "<!-- results:nothing_yet -->\nkeep\n<!-- /results -->" in text
  assert text.startswith("# t\n") and "\ntext\n" in text
  assert m.main(argv + ["--check"]) == 0        # idempotent
  assert m.main(argv) == 0 and readme.read_text() == text


def test_repo_readme_is_up_to_date():
  """The repository's README holds exactly what `update_readme.py` copies into it: what
  `python benchmarks/update_readme.py --check` checks (it exits 1 otherwise)."""
  m = _mod()
  old = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  new, missing = m.render(old, ROOT)
  assert not missing, f"result blocks without a results file: {missing}"
  assert new == old, ("README.md is out of date (a results file changed or a table was "
                      "edited by hand): run python benchmarks/update_readme.py")
  assert m.main(["--check"]) == 0


def test_check_fails_on_a_hand_edited_table(tmp_path):
  """A copy of the repository's README and results with one number of a table changed by
  hand fails `--check`; putting the number back passes it."""
  m = _mod()
  for d in m.SEARCH:
    shutil.copytree(os.path.join(ROOT, d), tmp_path / d)
  text, _ = m.render(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), ROOT)
  readme = tmp_path / "README.md"
  readme.write_text(text, encoding="utf-8")
  assert m.main(["--readme", str(readme), "--check"]) == 0
  rows = [(b.start("body") + r.start(1)) for b in m.BLOCK.finditer(text)
          for r in re.finditer(r"^\|[^\n]*\| (\d+\.\d+) \|", b.group("body"), re.M)]
  assert rows, "no numeric table row in the README result blocks"
  i = rows[0]
  digit = str((int(text[i]) + 1) % 10)
  readme.write_text(text[:i] + digit + text[i + 1:], encoding="utf-8")
  assert m.main(["--readme", str(readme), "--check"]) == 1
  assert m.main(["--readme", str(readme)]) == 0                        # rewritten from results
  assert readme.read_text(encoding="utf-8") == text
