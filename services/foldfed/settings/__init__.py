"""One typed settings registry: every variable foldfed reads, declared once.

- `registry.py` declares each variable: name, type, default, constraint, one-line doc and
  the roles that read it (`Settings`).
- `load(env)` parses a mapping (default os.environ; a .env file beneath it if given) into
  one frozen `Settings`; a bad value raises ConfigError naming the variable and the value
  (`FOLDFED_STEPS='abc' is not an integer`). `required(value, field)` is how a service
  demands a variable only its role needs; `variable(field)` names a field's variable,
  `default(field)` gives its default, `was_given(settings, field)` says whether the
  environment set it.
- `env_for(**typed)` turns typed values into environment strings, checked by the same
  parser: the demo, load tests and fixtures build environments with it.
- `readme.py` renders README's variable table (`python -m foldfed.settings --write
  README.md`); a test fails when README drifts.

Why pydantic-settings: typed fields with constraints (bounds, Literal choices,
validators) and error records that carry the variable and the bad input, so one formatter
names both; environment and .env-file sources (12-factor: "env vars and a file") that can
be fed a given mapping instead of process state; frozen models. It is pydantic's own,
widely used and actively maintained companion, and it replaces the hand-written
`_int/_float` parsers once spread over many modules.
"""

from foldfed.settings.parse import default, env_for, load, required, variable, was_given
from foldfed.settings.registry import Settings

__all__ = ["Settings", "default", "env_for", "load", "required", "variable", "was_given"]
