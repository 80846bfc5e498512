"""The ``aslcal`` command line: thin — parse, call the library, map errors to exit codes.

``main(argv=None) -> int`` is testable in-process.  Errors from bad input print one line
``aslcal: error: ...`` on stderr and return 2 (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence

from .. import __version__
from ..errors import AslcalError

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_ERROR = 2


class UsageError(AslcalError):
    """A command-line usage error (unknown option, bad value): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``aslcal calib: error: ...``), not the usage."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):
        # Unknown options are found by the top-level parser once the subcommand has
        # parsed: name the subcommand whose --help lists the valid ones.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = f"{self.prog} {ns.command}" if getattr(ns, "command", None) else self.prog
            raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extras)} (see '{prog} --help')")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from . import calib, cohort, demo, info, voxelwise  # noqa: F401  (subcommand modules)

    parser = _Parser(
        prog="aslcal",
        description=(
            "Calibration of arterial spin labelling (ASL) MRI: M0 estimation and voxelwise "
            "saturation-recovery / Look-Locker T1 and M0 fits on CPU or GPU.  Units: TR, TI, "
            "T1 in seconds; TE, T2, T2* in milliseconds; flip angles in degrees."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aslcal {__version__}")
    # --debug and -q go before or after the command (aslcal --debug info, aslcal info --debug):
    # the subcommand's copies default to SUPPRESS so that they do not reset the top level's.
    for target, default in ((parser, False), (common := _Parser(add_help=False), argparse.SUPPRESS)):
        target.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logging")
        target.add_argument("-q", "--quiet", action="store_true", default=default,
                            help="print only results, warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (calib, voxelwise, cohort, demo, info):
        module.add_parser(sub, common)
    for command in sub.choices.values():
        # what the user typed for each value (for errors the library words by keyword)
        command.set_defaults(_typed_as={
            a.dest: max(a.option_strings, key=len) for a in command._actions if a.option_strings})
    return parser


#: ``name=value: ...`` or ``name and other: ...`` at the start of a library message.
_KEYWORD_VALUE = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+?): """)
_KEYWORD_PAIR = re.compile(r"(\w+) and (\w+): ")


def _as_typed(text: str, args: argparse.Namespace, options: Mapping[str, str]) -> str:
    """A library message that names a keyword (``bs_efficiency=2.0: ...``), rewritten with
    the option the user typed (``--bs-efficiency 2.0: ...``) when the value is the one given
    on the command line (not, say, one read from a sidecar)."""
    if (m := _KEYWORD_PAIR.match(text)) and all(getattr(args, k, None) is not None and k in options
                                                  for k in m.groups()):
        return f"{options[m.group(1)]} and {options[m.group(2)]}: {text[m.end():]}"
    m = _KEYWORD_VALUE.match(text)
    if m is None or m.group(1) not in options:
        return text
    given = getattr(args, m.group(1), None)
    if given is None or isinstance(given, bool) or m.group(2) not in (repr(given), repr(str(given))):
        return text
    value = shlex.quote(given) if isinstance(given, str) else m.group(2)
    return f"{options[m.group(1)]} {value}: {text[m.end():]}"


def _check_environment() -> None:
    """An invalid ASLCAL_BACKEND / ASLCAL_DTYPE / ASLCAL_GZIP stops every command up front
    (exit 2, one line), even one that would not have used it."""
    from ..config import get_config
    from ..io.nifti import gzip_backends

    get_config()
    gzip_backends()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aslcal`` command line; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except UsageError as exc:
        # "aslcal calib: <message> (see 'aslcal calib --help')": one "aslcal: error:" prefix
        # as every error has; the hint names the subcommand
        _, _, msg = str(exc).partition(": ")
        print(f"aslcal: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for provenance records
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    # aslcal's own messages at that level; other libraries' only from INFO (numba's compiler
    # logs its every pass at DEBUG: hundreds of thousands of lines on a cold cache)
    logging.basicConfig(level=max(level, logging.INFO), format="aslcal: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("aslcal").setLevel(level)
    try:
        with warnings.catch_warnings(record=True) as caught:
            # aslcal's own warnings (e.g. an assumed labelling efficiency) become one line each
            warnings.simplefilter("always", UserWarning)
            try:
                _check_environment()
                return int(args.func(args) or EXIT_OK)
            finally:
                for w in caught:
                    print(f"aslcal: warning: {w.message}", file=sys.stderr)
    except AslcalError as exc:
        if args.debug:  # the traceback too, with the same exit status
            traceback.print_exc(file=sys.stderr)
        print(f"aslcal: error: {_as_typed(str(exc), args, getattr(args, '_typed_as', {}))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the file system refused (read-only, full, permissions): one line
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"aslcal: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = ": rerun with --resume to finish" if getattr(args, "command", None) == "cohort" else ""
        print(f"aslcal: interrupted{hint}", file=sys.stderr)
        return 130
