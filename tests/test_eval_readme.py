"""benchmarks/update_readme.py: result tables are copied into README.md, never typed."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mod():
  spec = importlib.util.spec_from_file_location(
      "update_readme", os.path.join(ROOT, "benchmarks", "update_readme.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  return m


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


def test_repo_readme_blocks_resolve_or_are_pending():
  m = _mod()
  new, missing = m.render(open(os.path.join(ROOT, "README.md")).read(), ROOT)
  assert isinstance(new, str) and isinstance(missing, list)
