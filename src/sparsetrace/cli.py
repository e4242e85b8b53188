"""The ``sparsetrace`` command line: one subcommand per module in ``sparsetrace.commands``.

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int`` and keeps heavy imports
inside ``run`` so ``sparsetrace --help`` stays fast. User mistakes (``ValueError``, ``FileNotFoundError``,
``TraceError``, unreadable files) end as one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = ("trace", "fidelity", "anchors", "niah", "view", "report", "plot")


def _load_commands() -> dict:
    modules = {}
    for name in COMMANDS:
        try:
            modules[name] = importlib.import_module(f"sparsetrace.commands.{name}")
        except ModuleNotFoundError as err:  # a command not built yet is simply absent
            if err.name != f"sparsetrace.commands.{name}":
                raise
    return modules


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsetrace`` script; returns the exit status."""
    modules = _load_commands()
    parser = argparse.ArgumentParser(
        prog="sparsetrace",
        description="Sparse tracing of attention in Hugging Face causal LMs at 100k-1M tokens.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, IndexError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, UnicodeDecodeError) as err:
        print(f"sparsetrace {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsetrace {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
