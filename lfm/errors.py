"""User-facing problems: errors that end a command and warnings that do not."""
import sys


class UsageError(Exception):
    """A bad path, data layout or option: the command line prints the message and exits with code 2."""


def warn(command: str, message: str):
    """Print `lfm <command>: warning: <message>` to stderr; the command goes on."""
    print(f"lfm {command}: warning: {message}", file=sys.stderr)
