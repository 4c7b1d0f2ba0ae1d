"""``python -m stafinetune <command> [overrides]``: the console scripts as one module.

What launchers that start a module need (``torchrun -m stafinetune train ...``,
``deepspeed --module stafinetune train ...``); the same as ``stafinetune-<command> ...``.
"""

from __future__ import annotations

import importlib
import sys

from stafinetune.commands import COMMANDS
from stafinetune.commands.cli import strip_launcher_args


def usage() -> str:
    """The help text: one line per command."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m stafinetune <command> [hydra overrides...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "`python -m stafinetune <command> --help` lists a command's configuration."]
    return "\n".join(lines)


def main() -> None:
    """Run the command named by the first argument with the rest of the command line."""
    # the deepspeed launcher puts --local_rank=N before the module's own arguments
    args = strip_launcher_args(sys.argv[1:])
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    name = args[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} (one of {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"stafinetune-{name}", *args[1:]]
    importlib.import_module(f"stafinetune.commands.{name}").main()


if __name__ == "__main__":
    main()
