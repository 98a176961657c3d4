"""``python -m trainers COMMAND``: ``run`` (one run), ``compare`` (memory modes x seeds), ``demo``."""

import sys


def main(argv: list[str] | None = None) -> None:
    from . import compare, demo, run
    commands = {"run": run.main, "compare": compare.main, "demo": demo.main}
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m trainers {{{','.join(commands)}}} [options]")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
