from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_REJECTED: _ClassVar[EventKind]
    EVENT_KIND_UPLOAD_STARTED: _ClassVar[EventKind]
    EVENT_KIND_UPLOAD_FINISHED: _ClassVar[EventKind]
    EVENT_KIND_DELIVERED: _ClassVar[EventKind]
    EVENT_KIND_STEP_RELEASED: _ClassVar[EventKind]
    EVENT_KIND_RELEASE_RECEIVED: _ClassVar[EventKind]
    EVENT_KIND_MODEL_MISMATCH: _ClassVar[EventKind]
    EVENT_KIND_CYCLE_DONE: _ClassVar[EventKind]
    EVENT_KIND_STEP_FINALIZED: _ClassVar[EventKind]
    EVENT_KIND_STRAGGLER: _ClassVar[EventKind]
    EVENT_KIND_SILENT: _ClassVar[EventKind]
    EVENT_KIND_READINESS: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_REJECTED: EventKind
EVENT_KIND_UPLOAD_STARTED: EventKind
EVENT_KIND_UPLOAD_FINISHED: EventKind
EVENT_KIND_DELIVERED: EventKind
EVENT_KIND_STEP_RELEASED: EventKind
EVENT_KIND_RELEASE_RECEIVED: EventKind
EVENT_KIND_MODEL_MISMATCH: EventKind
EVENT_KIND_CYCLE_DONE: EventKind
EVENT_KIND_STEP_FINALIZED: EventKind
EVENT_KIND_STRAGGLER: EventKind
EVENT_KIND_SILENT: EventKind
EVENT_KIND_READINESS: EventKind

class Event(_message.Message):
    __slots__ = ("kind", "service", "participant", "step", "detail", "metrics", "unix_ms", "subject")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    service: str
    participant: str
    step: int
    detail: str
    metrics: _containers.ScalarMap[str, float]
    unix_ms: int
    subject: str
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., service: _Optional[str] = ..., participant: _Optional[str] = ..., step: _Optional[int] = ..., detail: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., unix_ms: _Optional[int] = ..., subject: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("service", "participant", "step", "state", "unix_ms")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    service: str
    participant: str
    step: int
    state: str
    unix_ms: int
    def __init__(self, service: _Optional[str] = ..., participant: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[str] = ..., unix_ms: _Optional[int] = ...) -> None: ...
