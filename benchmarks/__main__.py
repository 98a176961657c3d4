"""``python -m benchmarks``: the side-by-side run (see :mod:`benchmarks.sidebyside`)."""

from .sidebyside import main

main()
