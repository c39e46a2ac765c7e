"""`python scripts/benchmark <command> ...` (see the package docstring)."""
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
for folder in (SCRIPTS.parent, SCRIPTS):  # the repository (stepvideo) and scripts/ (this package, synthetic_weights)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
