"""Execute every notebook in notebooks/ on CPU (nbclient); any error fails the test.

The kernel is the `python3` kernel of the interpreter running the tests (ipykernel's
native kernelspec resolves to `sys.executable`, i.e. the .venv)."""
import glob
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_are_generated_from_the_script():
  """The .ipynb files match notebooks/make_notebooks.py (edit the script, then rerun it)."""
  sys.path.insert(0, os.path.join(ROOT, "notebooks"))
  try:
    import make_notebooks
  finally:
    sys.path.pop(0)
  assert sorted(os.path.basename(p) for p in NOTEBOOKS) == sorted(make_notebooks.NOTEBOOKS)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    want = [c["source"] for c in make_notebooks.NOTEBOOKS[os.path.basename(path)]]
    assert [c["source"] for c in nb.cells] == want, f"{path} is stale: run make_notebooks.py"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    if "sequence_parallel" in path:   # XLA_FLAGS before anything imports jax
      assert "XLA_FLAGS" in first_code.source and "import jax" not in first_code.source
    else:
      assert "find_spec(\"linjax\")" in first_code.source   # the Colab install cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)} failed:\n{str(e)[-3000:]}")
