"""Settings declared once: a dataclass field carries its default, its help and its command-line spelling, and the
CLI builds its options from the fields (cli.py), so no default is written twice (`TrainConfig`, `ServeOptions`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable


def option(default: Any, help: str | Callable[[], str], **cli: Any) -> Any:
    """A field and its option in one place. `cli`: `flag`, `cli_default`, `cli_type`, or any typer.Option keyword
    (`envvar`, `metavar`, ...); `help` may be a function returning the text, called when the CLI is built."""
    kind = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kind, metadata={"help": help, **cli})
