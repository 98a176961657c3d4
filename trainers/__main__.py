"""``python -m trainers COMMAND``: ``run`` (one run), ``compare`` (memory modes x seeds), ``demo``.

Only the chosen command's module is imported, and ``run`` parses its flags (:mod:`trainers.options`,
torch-free) before the runner loads torch: ``run --help`` answers at once.
"""

import importlib
import sys

COMMANDS = ("run", "compare", "demo")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m trainers {{{','.join(COMMANDS)}}} [options]")
    if argv[0] == "run":
        from .options import run_parser
        args = run_parser().parse_args(argv[1:])
        from .run import run_from_args
        run_from_args(args)
        return
    importlib.import_module(f"{__package__}.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
