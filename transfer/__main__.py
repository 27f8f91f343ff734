"""``python -m transfer <command>``: small entry point for the suite's utility commands.

Commands:
  make-toy-data OUT [--seed N] [--scale S] [--classes K] [--force]
                                                       write the built-in toy world (every layout)
  make-imagenet100 IMAGENET_DIR OUT [--copy] [--force] build ImageNet-100 from a full ImageNet folder

Each task also has its own module: ``python -m transfer.convert``, ``python -m transfer.detection``,
``python -m transfer.linear``, ``python -m transfer.tables``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"make-toy-data": "transfer.toydata", "make-imagenet100": "transfer.imagenet100"}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    module = __import__(commands[command], fromlist=["main"])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
