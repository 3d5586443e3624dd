"""Help screens that read like the tools users know: `INPUT...`, `TEXT`, `N` instead of typer's raw
`{INPUT...}...`, `<list[str]>`, `<str>` and `<bool>`.

`CleanGroup` is the app's group class: every command it hands out (and every sub-group) gets its
arguments and options switched to the classes below, so commands added later read the same.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

_TYPE_NAMES = {"str": "TEXT", "int": "N", "int range": "N", "float": "NUMBER", "float range": "NUMBER",
               "path": "PATH", "Path": "PATH"}


class CleanArgument(TyperArgument):
    def _usage_display_name(self) -> str:
        name = self.metavar or (self.name or "ARG").upper()
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required else f"[{name}]"

    def _rich_display_name(self) -> str:
        return self._usage_display_name()

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class CleanOption(TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        raw = (self.display_type(ctx) or "").strip("<>")
        return _TYPE_NAMES.get(raw, raw.upper())


def clean(command: Any) -> Any:
    """Switch a command's parameters (its help option included) to the clean classes."""
    for param in command.params:
        if isinstance(param, TyperArgument):
            param.__class__ = CleanArgument
        elif isinstance(param, TyperOption):
            param.__class__ = CleanOption
    if isinstance(command, TyperCommand | TyperGroup) and not getattr(command, "_clean_help", False):
        original = command.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = original(ctx)
            if isinstance(option, TyperOption):
                option.__class__ = CleanOption
            return option

        command.get_help_option = get_help_option  # type: ignore[method-assign]
        setattr(command, "_clean_help", True)  # noqa: B010
    return command


class CleanGroup(TyperGroup):
    """The app's group: hands out commands with clean help (see the module docstring)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return clean(command) if command is not None else None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        clean(self)
        super().format_help(ctx, formatter)
