"""The ``surgeon`` console script. Only the standard library is imported before the guards are in place: torch
and the CLI take seconds to import, and an interrupt then must end in one line, not a traceback (importing
``surgeon`` itself is kept to a few small modules for this).

Guards for the whole process: Ctrl-C exits 130 with one line; a closed output pipe (``surgeon ... | head``) ends
the command quietly, as Unix tools do; a file-size limit (``ulimit -f``) makes a write fail with an error that
names the file, instead of SIGXFSZ killing the process.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a Unix tool killed by a closed pipe reports


def main() -> None:
    try:
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        try:
            from surgeon.cli.app import main as run

            run()
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
    except KeyboardInterrupt:  # while importing; the command group reports interrupts that come later itself
        sys.stderr.write("error: interrupted\nhint: nothing was written; run the command again\n")
        sys.exit(INTERRUPTED)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more can reach the reader
        sys.exit(BROKEN_PIPE)


if __name__ == "__main__":
    main()
