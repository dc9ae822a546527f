"""The ``surgeon`` console script. Only the standard library is imported before the Ctrl-C guard is in place:
torch and the CLI take seconds to import, and an interrupt then must end in one line, not a traceback."""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def main() -> None:
    try:
        from surgeon.cli.app import main as run

        run()
    except KeyboardInterrupt:  # while importing; the command group reports interrupts that come later itself
        sys.stderr.write("error: interrupted\nhint: nothing was written; run the command again\n")
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
