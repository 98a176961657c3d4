"""``python -m trainers COMMAND``: ``demo`` (see :mod:`trainers.demo`)."""

import sys

from . import demo

COMMANDS = {"demo": demo.main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m trainers {{{','.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
