"""A click group that imports a command's module when the command is used.

``qcow2snap info`` should not pay at start-up for defining the options of
twenty other commands (~170 ``click.Option`` objects: about a tenth of the
start-up of ``info``; docs/performance.md, "Start-up, second pass").
:class:`LazyGroup` knows those commands by name, with the first paragraph of
each one's help, from a static table; the module that defines (and
registers) them is imported when one of them is looked up: to run it, or to
show its ``--help``.  The group's own ``--help`` lists them from the table,
as click would from the commands (``tests/test_cli.py`` compares the two).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click

__all__ = ["LazyGroup"]


class LazyGroup(click.Group):
    """``lazy_commands`` maps a command's name to the module that registers
    it on this group when imported, and the first paragraph of its help."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            importlib.import_module(self.lazy_commands[cmd_name][0])
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and args[0] not in self.lazy_commands:
            self.load_all()  # a name click does not know: it suggests from every command
        return super().resolve_command(ctx, args)

    def load_all(self) -> None:
        """Import every command's module (what documentation checks walk)."""
        for module, _ in self.lazy_commands.values():
            importlib.import_module(module)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing of the commands, with the help of those not
        loaded from the table (nothing is imported for ``--help``)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:  # click's shortening of the table's help
                command = click.Command(name, help=self.lazy_commands[name][1])
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
