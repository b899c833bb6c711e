"""The convention every command-line entry point follows.

An entry module has `main(argv=None) -> int` (argv: the arguments after the program name;
None: sys.argv[1:]) that returns `run(PROG, parse_args, body, argv)`, and ends with
`if __name__ == "__main__": sys.exit(main())`. `run` parses the arguments (`ArgumentParser`
reports a bad flag as one line `PROG: error: ...`, exit status 2), calls `body(args)` and turns a user
error, i.e. bad input (ConfigError, ValueError, FileNotFoundError), into one line
`PROG: error: MESSAGE` on stderr and exit status 2, never a traceback. Anything else is a bug
and keeps its traceback.
"""
import argparse
import sys
from typing import Callable, Optional, Sequence

from lmjax.extras import MissingExtra
from lmjax.registry import ConfigError

USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, MissingExtra)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for entry points: a bad or missing flag is one line `PROG: error: ...` and exit
    status 2 like any other user error (plain argparse prints its usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help.\n")


def error_line(prog: str, error: BaseException) -> str:
    """`PROG: error: MESSAGE`, the message folded onto one line."""
    message = " ".join(str(error).split("\n")).strip() or type(error).__name__
    return f"{prog}: error: {message}"


def run(prog: str, parse_args: Callable, body: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """`body(parse_args(argv))` -> its exit status (None counts as 0); a user error -> status 2
    and one line on stderr."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        status = body(args)
    except USER_ERRORS as error:
        print(error_line(prog, error), file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
