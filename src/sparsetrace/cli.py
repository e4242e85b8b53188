"""The ``sparsetrace`` command line: one subcommand per module in ``sparsetrace.commands``.

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int`` and keeps heavy imports
inside ``run`` so ``sparsetrace --help`` stays fast. What a user got wrong (:class:`UsageError`) ends as
one sentence on stderr and exit status 2; anything else is a bug in sparsetrace and shows its traceback
with a line saying so (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings

from .errors import UsageError

COMMANDS = ("trace", "fidelity", "anchors", "niah", "sources", "view", "report", "plot")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsetrace`` script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparsetrace",
        description="Sparse tracing of attention in Hugging Face causal LMs at 100k-1M tokens.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {name: importlib.import_module(f"sparsetrace.commands.{name}") for name in COMMANDS}
    for module in modules.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return modules[args.command].run(args) or 0
    except UsageError as err:
        print(f"sparsetrace {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsetrace {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- anything else is ours to fix: show all of it
        traceback.print_exc()
        print(f"sparsetrace {args.command}: this is a bug in sparsetrace, not a mistake in your input; "
              "please report it with the traceback above.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
