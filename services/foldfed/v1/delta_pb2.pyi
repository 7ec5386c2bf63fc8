from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_SAFETENSORS: _ClassVar[Codec]
    CODEC_CODED_VECTOR: _ClassVar[Codec]
    CODEC_MASKED_RING: _ClassVar[Codec]
CODEC_UNSPECIFIED: Codec
CODEC_SAFETENSORS: Codec
CODEC_CODED_VECTOR: Codec
CODEC_MASKED_RING: Codec

class TensorLayout(_message.Message):
    __slots__ = ("name", "dtype", "shape", "begin", "end")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    begin: int
    end: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class DeltaManifest(_message.Message):
    __slots__ = ("format_version", "step", "participant", "weight", "codec", "tensors", "chunk_size", "payload_size", "chunk_digests", "payload_digest", "base_model_digest", "codec_spec", "cycle", "codec_seed", "chunk_sizes", "shared_ranges_digest", "block_stats", "next_ranges_digest", "signature", "ring_bits", "attested_norm")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    CODEC_SEED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZES_FIELD_NUMBER: _ClassVar[int]
    SHARED_RANGES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STATS_FIELD_NUMBER: _ClassVar[int]
    NEXT_RANGES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_NORM_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    step: int
    participant: str
    weight: float
    codec: Codec
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    chunk_size: int
    payload_size: int
    chunk_digests: _containers.RepeatedScalarFieldContainer[bytes]
    payload_digest: bytes
    base_model_digest: bytes
    codec_spec: str
    cycle: int
    codec_seed: int
    chunk_sizes: _containers.RepeatedScalarFieldContainer[int]
    shared_ranges_digest: bytes
    block_stats: bytes
    next_ranges_digest: bytes
    signature: bytes
    ring_bits: int
    attested_norm: float
    def __init__(self, format_version: _Optional[int] = ..., step: _Optional[int] = ..., participant: _Optional[str] = ..., weight: _Optional[float] = ..., codec: _Optional[_Union[Codec, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ..., chunk_size: _Optional[int] = ..., payload_size: _Optional[int] = ..., chunk_digests: _Optional[_Iterable[bytes]] = ..., payload_digest: _Optional[bytes] = ..., base_model_digest: _Optional[bytes] = ..., codec_spec: _Optional[str] = ..., cycle: _Optional[int] = ..., codec_seed: _Optional[int] = ..., chunk_sizes: _Optional[_Iterable[int]] = ..., shared_ranges_digest: _Optional[bytes] = ..., block_stats: _Optional[bytes] = ..., next_ranges_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., ring_bits: _Optional[int] = ..., attested_norm: _Optional[float] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("step", "participant", "index", "digest", "body")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    step: int
    participant: str
    index: int
    digest: bytes
    body: bytes
    def __init__(self, step: _Optional[int] = ..., participant: _Optional[str] = ..., index: _Optional[int] = ..., digest: _Optional[bytes] = ..., body: _Optional[bytes] = ...) -> None: ...
