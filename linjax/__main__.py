"""python -m linjax ... (the same as the `linjax` command)."""
import sys

from linjax.cli import main

sys.exit(main())
