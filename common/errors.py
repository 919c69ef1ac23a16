"""One-line errors for bad user input, and the CLI wrapper that prints them without a traceback."""

import sys


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix, on one line."""


def run_cli(main, *args):
    """Call `main(*args)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
