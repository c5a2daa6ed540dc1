"""User-facing problems: errors that end a command and warnings that do not."""
import sys


class UsageError(Exception):
    """A bad path, data layout, option or weights file: the command line prints the message and exits
    with code 2."""


class CommandFailed(Exception):
    """A command that cannot go on for a reason other than its input (e.g. a model that scores NaN):
    the command line prints the message and exits with code 1."""


def warn(command: str, message: str):
    """Print `lfm <command>: warning: <message>` to stderr; the command goes on."""
    print(f"lfm {command}: warning: {message}", file=sys.stderr)
