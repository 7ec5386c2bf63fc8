from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HaveRequest(_message.Message):
    __slots__ = ("step", "participant", "manifest_id", "request_id")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    participant: str
    manifest_id: bytes
    request_id: str
    def __init__(self, step: _Optional[int] = ..., participant: _Optional[str] = ..., manifest_id: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class HaveReply(_message.Message):
    __slots__ = ("step", "participant", "manifest_id", "request_id", "missing", "error")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: int
    participant: str
    manifest_id: bytes
    request_id: str
    missing: _containers.RepeatedScalarFieldContainer[int]
    error: str
    def __init__(self, step: _Optional[int] = ..., participant: _Optional[str] = ..., manifest_id: _Optional[bytes] = ..., request_id: _Optional[str] = ..., missing: _Optional[_Iterable[int]] = ..., error: _Optional[str] = ...) -> None: ...

class DeliveryReceipt(_message.Message):
    __slots__ = ("step", "participant", "manifest_id", "payload_digest", "chunk_count", "payload_size", "duplicate_chunks", "completed_unix_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    participant: str
    manifest_id: bytes
    payload_digest: bytes
    chunk_count: int
    payload_size: int
    duplicate_chunks: int
    completed_unix_ms: int
    def __init__(self, step: _Optional[int] = ..., participant: _Optional[str] = ..., manifest_id: _Optional[bytes] = ..., payload_digest: _Optional[bytes] = ..., chunk_count: _Optional[int] = ..., payload_size: _Optional[int] = ..., duplicate_chunks: _Optional[int] = ..., completed_unix_ms: _Optional[int] = ...) -> None: ...
