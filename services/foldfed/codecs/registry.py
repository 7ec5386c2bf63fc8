"""The codecs by name: a spec string (spec.py) in, a codec out; and the cycle check.

| spec | module | linear_shared |
|---|---|---|
| `fp32:v1` | floats | no |
| `bf16:v1` | floats | no |
| `int8:v1;block=B` | int8 | no |
| `rotated:v1;bits=b;block=B;mult=M;rounding=R;scale=block` | rotated | no |
| `rotated:v1;bits=b;block=B;floor=F;init=I;mult=M;rounding=R;scale=shared` | rotated | yes |
| any of these `+zstd:v1;level=N` | zstdlayer | as the inner codec |

An unknown name or version, a parameter the codec does not define, a missing one, or a
spec that is not canonical raises CodecError with the reason. `require_cycle_codec`
compares a manifest's spec with the cycle's: shared parameters (rotation, ranges) only
mean something if all agree. A cycle may also allow *member choices* (`check_choices`):
per-member specs (no shared ranges) a member may send instead of the cycle's spec when its
link needs them (adaptive.py); `require_allowed_codec` accepts the cycle's spec or one of
those. The fp32 reference is never a choice: it travels as a safetensors payload, outside
error feedback, so a member that switched to it would drop its residual.
"""

from __future__ import annotations

from foldfed.codecs.base import Codec
from foldfed.codecs.floats import Bf16Codec, Fp32Codec
from foldfed.codecs.int8 import Int8Codec
from foldfed.codecs.rotated import ROUNDINGS, SCALES, RotatedCodec, SharedScaleRule
from foldfed.codecs.spec import (
    Layer,
    check_keys,
    parse_spec,
    read_float,
    read_int,
    read_word,
)
from foldfed.codecs.zstdlayer import ZstdLayer
from foldfed.errors import CodecError

NAMES = ("fp32", "bf16", "int8", "rotated")
REFERENCE_SPEC = "fp32:v1"
_ROTATED_SHARED = ("bits", "block", "floor", "init", "mult", "rounding", "scale")
_ROTATED_BLOCK = ("bits", "block", "mult", "rounding", "scale")


def codec_from_spec(text: str) -> Codec:
    """The codec `text` names; CodecError if it is unknown, malformed or not canonical."""
    layers = parse_spec(text)
    codec = _base(layers[0])
    for layer in layers[1:]:
        if (layer.name, layer.version) != ("zstd", 1):
            raise CodecError(
                f"codec spec {text!r}: unknown outer layer {layer.name}:v{layer.version}"
            )
        check_keys(layer, ("level",))
        codec = ZstdLayer(codec, read_int(layer, "level", 1, 19))
    if codec.spec != text:
        raise CodecError(f"codec spec {text!r} is not canonical: write {codec.spec!r}")
    return codec


def _base(layer: Layer) -> Codec:
    key = (layer.name, layer.version)
    if layer.name not in NAMES:
        raise CodecError(f"unknown codec {layer.name!r} (known: {', '.join(NAMES)})")
    if key == ("fp32", 1):
        check_keys(layer, ())
        return Fp32Codec()
    if key == ("bf16", 1):
        check_keys(layer, ())
        return Bf16Codec()
    if key == ("int8", 1):
        check_keys(layer, ("block",))
        return Int8Codec(read_int(layer, "block", 8, 1 << 20))
    if key == ("rotated", 1):
        scale = read_word(layer, "scale", SCALES)
        check_keys(layer, _ROTATED_SHARED if scale == "shared" else _ROTATED_BLOCK)
        rule = None
        if scale == "shared":
            rule = SharedScaleRule(
                floor=read_float(layer, "floor", -1.0, 1.0),
                init=read_float(layer, "init", 0.0, 1e30),
            )
        return RotatedCodec(
            read_int(layer, "bits", 1, 8),
            read_int(layer, "block", 8, 1 << 20),
            mult=read_float(layer, "mult", 0.0, 1e6),
            rounding=read_word(layer, "rounding", ROUNDINGS),
            scale=scale,
            rule=rule,
        )
    raise CodecError(f"codec {layer.name!r} has no version {layer.version}")


def require_cycle_codec(manifest_spec: str, cycle_spec: str) -> Codec:
    """The manifest's codec, if it is exactly the cycle's; CodecError naming the difference."""
    codec = codec_from_spec(manifest_spec)
    if manifest_spec != cycle_spec:
        raise CodecError(_difference(manifest_spec, cycle_spec))
    return codec


def check_choices(cycle_spec: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """`choices` if each is a canonical coded spec without shared ranges, distinct and not the
    cycle's own; CodecError naming the first that is not."""
    seen: set[str] = set()
    for spec in choices:
        codec = codec_from_spec(spec)
        if spec == REFERENCE_SPEC:
            raise CodecError(f"member choice {spec!r}: the fp32 reference is not a choice "
                             "(it travels outside error feedback)")  # fmt: skip
        if codec.linear_shared:
            raise CodecError(f"member choice {spec!r} has shared ranges: only the cycle's "
                             "spec may (every member of a step must agree on them)")  # fmt: skip
        if spec == cycle_spec or spec in seen:
            raise CodecError(f"member choice {spec!r} is listed twice (or is the cycle's spec)")
        seen.add(spec)
    return choices


def require_allowed_codec(manifest_spec: str, cycle_spec: str, choices: tuple[str, ...]) -> Codec:
    """The manifest's codec, if it is the cycle's or one of the cycle's member choices."""
    if manifest_spec in choices:
        return codec_from_spec(manifest_spec)
    try:
        return require_cycle_codec(manifest_spec, cycle_spec)
    except CodecError as exc:
        if not choices:
            raise
        raise CodecError(f"{exc}; nor is it one of the cycle's member choices "
                         f"{', '.join(repr(c) for c in choices)}") from None  # fmt: skip


def _difference(got: str, want: str) -> str:
    base = f"codec {got!r} does not match the cycle's {want!r}"
    try:
        mine, theirs = parse_spec(got), parse_spec(want)
    except CodecError:
        return base
    if [(la.name, la.version) for la in mine] != [(la.name, la.version) for la in theirs]:
        return base + ": another codec or layer"
    diffs = []
    for a, b in zip(mine, theirs, strict=True):
        da, db = a.as_dict(), b.as_dict()
        diffs += [f"{a.name}.{k} {da.get(k)} vs {db.get(k)}" for k in sorted(set(da) | set(db))
                  if da.get(k) != db.get(k)]  # fmt: skip
    return base + (": " + ", ".join(diffs) if diffs else "")
