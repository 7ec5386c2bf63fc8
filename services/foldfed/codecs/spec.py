"""Codec specs: the versioned, canonical parameter string a manifest carries.

Grammar (ASCII, no spaces):

    spec   = layer *("+" layer)
    layer  = name ":v" version *(";" key "=" value)
    name   = key = [a-z][a-z0-9]*         version = [1-9][0-9]*
    value  = [A-Za-z0-9.+-]+              (an int, a float or a word; see the codec)

A spec is *canonical* when its keys are sorted (code-point order), each appears once, every
parameter the codec defines is written (no defaults left implicit) and each value is in its
canonical form: an int in decimal without leading zeros, a float as Python's shortest
round-trip `repr` (`3.0`, `0.25`, `1e-06`), a word in lower case. The first layer is the
codec, later layers wrap its bytes (`+zstd`). Two specs mean the same coding exactly when
their strings are equal, so the hub compares a manifest's spec with the cycle's as strings,
and a reader MUST reject a spec that is not canonical: otherwise one coding would have two
names and two manifest ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from foldfed.errors import CodecError

_NAME = re.compile(r"[a-z][a-z0-9]*")
_VALUE = re.compile(r"[A-Za-z0-9.+-]+")
_LAYER = re.compile(r"([a-z][a-z0-9]*):v([1-9][0-9]*)((?:;[^;]*)*)")


@dataclass(frozen=True)
class Layer:
    """One layer of a spec: a name, a version and its parameters (as written)."""

    name: str
    version: int
    params: tuple[tuple[str, str], ...] = ()

    def render(self) -> str:
        body = "".join(f";{k}={v}" for k, v in sorted(self.params))
        return f"{self.name}:v{self.version}{body}"

    def as_dict(self) -> dict[str, str]:
        return dict(self.params)


def parse_spec(text: str) -> list[Layer]:
    """The layers of `text`; CodecError naming the problem when it is malformed."""
    if not text:
        raise CodecError("empty codec spec")
    layers = []
    for part in text.split("+"):
        match = _LAYER.fullmatch(part)
        if not match:
            raise CodecError(f"codec spec {text!r}: layer {part!r} is not name:vN[;key=value]")
        name, version, rest = match.group(1), int(match.group(2)), match.group(3)
        params: dict[str, str] = {}
        for item in rest.split(";")[1:]:
            key, sep, value = item.partition("=")
            if not sep or not _NAME.fullmatch(key) or not _VALUE.fullmatch(value):
                raise CodecError(f"codec spec {text!r}: parameter {item!r} is not key=value")
            if key in params:
                raise CodecError(f"codec spec {text!r}: parameter {key!r} given twice")
            params[key] = value
        layers.append(Layer(name, version, tuple(params.items())))
    return layers


def render_spec(layers: list[Layer]) -> str:
    return "+".join(layer.render() for layer in layers)


def canonical_float(value: float) -> str:
    return repr(float(value))


def read_int(layer: Layer, key: str, low: int, high: int) -> int:
    """Parameter `key` of `layer` as an int in [low, high], in canonical form."""
    raw = _required(layer, key)
    # At most 19 digits: int() of a longer string is slow, and past 4300 digits a ValueError.
    if not re.fullmatch(r"-?(0|[1-9][0-9]{0,18})", raw):
        raise CodecError(f"codec {layer.name}: {key}={raw!r} is not a canonical integer")
    value = int(raw)
    if not low <= value <= high:
        raise CodecError(f"codec {layer.name}: {key}={value} outside [{low}, {high}]")
    return value


def read_float(layer: Layer, key: str, low: float, high: float) -> float:
    """Parameter `key` of `layer` as a finite float in (low, high], in canonical form."""
    raw = _required(layer, key)
    try:
        value = float(raw)
    except ValueError:
        raise CodecError(f"codec {layer.name}: {key}={raw!r} is not a number") from None
    if canonical_float(value) != raw:
        raise CodecError(
            f"codec {layer.name}: {key}={raw!r} is not canonical (write {canonical_float(value)})"
        )
    if not low < value <= high:
        raise CodecError(f"codec {layer.name}: {key}={value} outside ({low}, {high}]")
    return value


def read_word(layer: Layer, key: str, allowed: tuple[str, ...]) -> str:
    raw = _required(layer, key)
    if raw not in allowed:
        raise CodecError(f"codec {layer.name}: {key}={raw!r}, expected one of {allowed}")
    return raw


def check_keys(layer: Layer, keys: tuple[str, ...]) -> None:
    """Reject parameters `layer`'s codec does not define, and missing ones."""
    given = {k for k, _ in layer.params}
    extra, missing = sorted(given - set(keys)), sorted(set(keys) - given)
    if extra or missing:
        raise CodecError(
            f"codec {layer.name}:v{layer.version}: unknown parameters {extra}, missing {missing}"
        )
    if [k for k, _ in layer.params] != sorted(given):
        raise CodecError(f"codec {layer.name}: parameters must be sorted by key")


def _required(layer: Layer, key: str) -> str:
    for k, v in layer.params:
        if k == key:
            return v
    raise CodecError(f"codec {layer.name}: missing parameter {key!r}")
