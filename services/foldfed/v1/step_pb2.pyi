from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StepReleased(_message.Message):
    __slots__ = ("step", "model_digest", "participants", "released_unix_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    model_digest: bytes
    participants: _containers.RepeatedScalarFieldContainer[str]
    released_unix_ms: int
    def __init__(self, step: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., participants: _Optional[_Iterable[str]] = ..., released_unix_ms: _Optional[int] = ...) -> None: ...
