"""The one exception for bad user input, and the wrapper that turns it into exit code 2."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint): one line saying what and what to do."""


def cli(main):
    """Decorate a script's main(): a UserError prints `error: <message>` to stderr and exits 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped
