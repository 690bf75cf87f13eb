from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireTensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExpertForwardRequest(_message.Message):
    __slots__ = ("layer", "placement_version", "hidden", "local_ids", "weights", "call_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LOCAL_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    placement_version: int
    hidden: WireTensor
    local_ids: WireTensor
    weights: WireTensor
    call_id: int
    def __init__(self, layer: _Optional[int] = ..., placement_version: _Optional[int] = ..., hidden: _Optional[_Union[WireTensor, _Mapping]] = ..., local_ids: _Optional[_Union[WireTensor, _Mapping]] = ..., weights: _Optional[_Union[WireTensor, _Mapping]] = ..., call_id: _Optional[int] = ...) -> None: ...

class ExpertForwardResponse(_message.Message):
    __slots__ = ("output", "call_id", "error_code", "error")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    output: WireTensor
    call_id: int
    error_code: str
    error: str
    def __init__(self, output: _Optional[_Union[WireTensor, _Mapping]] = ..., call_id: _Optional[int] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ExpertInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("replica_id", "group", "placement_version", "dtype", "hidden_size", "layers", "slots", "device")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group: int
    placement_version: int
    dtype: str
    hidden_size: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    device: str
    def __init__(self, replica_id: _Optional[str] = ..., group: _Optional[int] = ..., placement_version: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., slots: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ...) -> None: ...
