"""Copy result tables into README.md, so README numbers are never typed by hand.

README.md marks each spot with a pair of comments naming a results file:

    <!-- results:ops_cpu -->
    (replaced by the contents of benchmarks/results/ops_cpu.md)
    <!-- /results -->

NAME is looked up as benchmarks/results/NAME.md, then experiments/results/NAME.md (or give
the path: `<!-- results:experiments/results/lolcats.md -->`). Relative links and images
inside the copied file are rewritten to stay valid from the repository root. A NAME whose
file does not exist yet is left as it is and reported.

    python benchmarks/update_readme.py            # rewrite README.md in place
    python benchmarks/update_readme.py --check    # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import posixpath
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ("benchmarks/results", "experiments/results")
BLOCK = re.compile(r"(<!-- results:(?P<name>[^ >]+) -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.S)
LINK = re.compile(r"(!?\[[^\]]*\]\()(?P<target>[^)\s]+)(\))")


def find_results(name: str, root: str = ROOT) -> str | None:
  """Path (relative to root) of the results file for a marker NAME, or None."""
  cands = [name] if name.endswith(".md") else []
  cands += [f"{d}/{name}.md" for d in SEARCH]
  for c in cands:
    if os.path.isfile(os.path.join(root, c)):
      return c
  return None


def _rebase_links(text: str, rel_dir: str) -> str:
  def fix(m):
    t = m.group("target")
    if re.match(r"^[a-z]+://|^#|^/|^mailto:", t):
      return m.group(0)
    return m.group(1) + posixpath.normpath(posixpath.join(rel_dir, t)) + m.group(3)
  return LINK.sub(fix, text)


def render(readme: str, root: str = ROOT) -> tuple[str, list[str]]:
  """(new README text, names whose results file is missing)."""
  missing = []

  def fill(m):
    rel = find_results(m.group("name"), root)
    if rel is None:
      missing.append(m.group("name"))
      return m.group(0)
    body = open(os.path.join(root, rel), encoding="utf-8").read().strip("\n")
    body = _rebase_links(body, posixpath.dirname(rel))
    note = f"<!-- copied from {rel} by benchmarks/update_readme.py; edit that file -->\n"
    return m.group(1) + note + body + "\n" + m.group(4)

  return BLOCK.sub(fill, readme), missing


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
  p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  args = p.parse_args(argv)
  root = os.path.dirname(os.path.abspath(args.readme))
  old = open(args.readme, encoding="utf-8").read()
  new, missing = render(old, root)
  for name in missing:
    print(f"warning: no results file for <!-- results:{name} --> "
          f"(looked in {', '.join(SEARCH)})", file=sys.stderr)
  n = len(BLOCK.findall(old))
  if args.check:
    if new != old:
      print("README.md is out of date: run python benchmarks/update_readme.py",
            file=sys.stderr)
      return 1
    print(f"README.md is up to date ({n} result blocks)")
    return 0
  if new != old:
    with open(args.readme, "w", encoding="utf-8") as f:
      f.write(new)
  print(f"updated {n - len(missing)} of {n} result blocks in {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
