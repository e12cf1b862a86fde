"""Expose pydantic-settings classes as click options, each showing its environment name.

An option given on the command line overrides the environment; an option left out falls
through to pydantic-settings, which reads `RELATA_*` and validates everything at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)
F = TypeVar("F", bound=Callable[..., Any])


def _env_name(cls: type[BaseSettings], field: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def _option_name(cls: type[BaseSettings], field: str, group: str) -> str:
    return f"--{group}-{field}".replace("_", "-") if group else f"--{field}".replace("_", "-")


def _dest_prefix(group: str) -> str:
    return f"{group.replace('-', '_')}__"


def settings_options(cls: type[BaseSettings], *, group: str) -> Callable[[F], F]:
    """Add one option per field of `cls`, named `--GROUP-FIELD`, with its env name in --help."""

    def decorate(func: F) -> F:
        for name, field in reversed(list(cls.model_fields.items())):
            default = field.default if field.default is not None else "none"
            help_text = (
                f"{field.description or ''} [env: {_env_name(cls, name)}; default: {default}]"
            )
            func = click.option(
                _option_name(cls, name, group),
                f"{_dest_prefix(group)}{name}",
                default=None,
                help=help_text,
                show_default=False,
            )(func)
        return func

    return decorate


def build_settings(cls: type[S], *, group: str, params: dict[str, Any]) -> S:
    """Build `cls` from the options of `group` in `params` plus the environment; exit on error."""
    prefix = _dest_prefix(group)
    overrides = {
        k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix) and v is not None
    }
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise click.UsageError(f"invalid {cls.__name__}: {exc}") from exc


def pop_group(params: dict[str, Any], group: str) -> dict[str, Any]:
    """Remove and return the options of `group` from a click params dict."""
    prefix = _dest_prefix(group)
    keys = [k for k in params if k.startswith(prefix)]
    return {k: params.pop(k) for k in keys}
