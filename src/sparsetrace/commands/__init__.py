"""Subcommands of the ``sparsetrace`` CLI: each module has ``add_parser(subparsers)`` and ``run(args)``."""
