from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StepReleased(_message.Message):
    __slots__ = ("step", "model_digest", "participants", "released_unix_ms", "update_manifest", "cycle", "final", "codec", "codec_seed", "weights", "codec_choices", "update_norm_bound")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CODEC_CHOICES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    step: int
    model_digest: bytes
    participants: _containers.RepeatedScalarFieldContainer[str]
    released_unix_ms: int
    update_manifest: bytes
    cycle: int
    final: bool
    codec: str
    codec_seed: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    codec_choices: _containers.RepeatedScalarFieldContainer[str]
    update_norm_bound: float
    def __init__(self, step: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., participants: _Optional[_Iterable[str]] = ..., released_unix_ms: _Optional[int] = ..., update_manifest: _Optional[bytes] = ..., cycle: _Optional[int] = ..., final: _Optional[bool] = ..., codec: _Optional[str] = ..., codec_seed: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., codec_choices: _Optional[_Iterable[str]] = ..., update_norm_bound: _Optional[float] = ...) -> None: ...

class FinalizeRequest(_message.Message):
    __slots__ = ("step", "participants", "cycle")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    step: int
    participants: _containers.RepeatedScalarFieldContainer[str]
    cycle: int
    def __init__(self, step: _Optional[int] = ..., participants: _Optional[_Iterable[str]] = ..., cycle: _Optional[int] = ...) -> None: ...

class StepFinalized(_message.Message):
    __slots__ = ("step", "update_manifest", "model_digest", "weight_sum", "finalized_unix_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    FINALIZED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    update_manifest: bytes
    model_digest: bytes
    weight_sum: float
    finalized_unix_ms: int
    def __init__(self, step: _Optional[int] = ..., update_manifest: _Optional[bytes] = ..., model_digest: _Optional[bytes] = ..., weight_sum: _Optional[float] = ..., finalized_unix_ms: _Optional[int] = ...) -> None: ...

class ModelReport(_message.Message):
    __slots__ = ("step", "participant", "model_digest", "metrics", "unix_ms")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    participant: str
    model_digest: bytes
    metrics: _containers.ScalarMap[str, float]
    unix_ms: int
    def __init__(self, step: _Optional[int] = ..., participant: _Optional[str] = ..., model_digest: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., unix_ms: _Optional[int] = ...) -> None: ...
