"""Environment mappings to `Settings` and back, with errors that name the variable.

`load(env)` parses a mapping (default os.environ) over an optional .env file (the mapping
wins), with pydantic-settings' own environment and dotenv sources. Values come only from
what is passed in, so a test passes a plain dict. Every variable is checked, not only the
ones the caller uses: a typo in a shared environment stops every service at start, not one
of them an hour later. Empty means unset (`FOLDFED_STEPS=` gives the default), as it always
has. `env_for(**typed)` is the way back, checked by the same parser.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings.sources import DotEnvSettingsSource, EnvSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

from foldfed.errors import ConfigError
from foldfed.settings.registry import Settings, as_env_text

_T = TypeVar("_T")
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}


class _GivenEnv(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, not os.environ."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._given = env  # read by _load_env_vars, which the base __init__ calls
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._given, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def load(env: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
    """Parse `env` (default os.environ), over `env_file` when given; ConfigError names
    every bad variable and its value."""
    values: dict[str, Any] = {}
    if env_file is not None:
        values.update(DotEnvSettingsSource(Settings, env_file=env_file)())
    values.update(_GivenEnv(os.environ if env is None else env)())
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError("; ".join(_message(e, values) for e in exc.errors())) from None


def _message(error: Any, values: Mapping[str, Any]) -> str:
    """One pydantic error as `FOLDFED_STEPS='abc' is not an integer`."""
    name = str(error["loc"][0])
    said = f"{name}={values.get(name, error['input'])!r}"
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{said} is not an integer"
    if kind in ("float_parsing", "float_type"):
        return f"{said} is not a number"
    if kind in _BOUNDS:
        return f"{said} must be {_BOUNDS[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        return f"{said}: expected {ctx['expected']}"
    if kind == "value_error":
        return f"{said}: {ctx['error']}"
    if kind == "string_pattern_mismatch":
        return f"{said} does not match {ctx['pattern']}"
    return f"{said}: {error['msg']}"


def required(value: _T | None, field: str) -> _T:
    """`value`, unless unset: then ConfigError '<VARIABLE> is not set'. For the settings
    only some roles need: `required(s.amqp_url, "amqp_url")`."""
    if value is None:
        raise ConfigError(f"{variable(field)} is not set")
    return value


def variable(field: str) -> str:
    """The environment variable of a Settings field: variable("steps") == "FOLDFED_STEPS"."""
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, str)
    return alias


def default(field: str) -> Any:
    """The registry's default of a field: default("model") == "mlp"."""
    return Settings.model_fields[field].default


def was_given(settings: Settings, field: str) -> bool:
    """Whether the environment set `field` (rather than the registry's default applying):
    what a check that follows "what the service was configured with" needs."""
    return field in settings.model_fields_set


def env_for(**values: Any) -> dict[str, str]:
    """Environment strings for typed values, keyed by Settings field (None: left out),
    checked by `load`: env_for(steps=3, tracing=False) == {"FOLDFED_STEPS": "3",
    "FOLDFED_TRACING": "off"}."""
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise TypeError(f"env_for: no such setting: {', '.join(unknown)}")
    env = {variable(k): as_env_text(v) for k, v in values.items() if v is not None}
    load(env)
    return env
