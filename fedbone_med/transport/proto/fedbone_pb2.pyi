# ruff: noqa
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("site", "client_hello")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HELLO_FIELD_NUMBER: _ClassVar[int]
    site: str
    client_hello: bytes
    def __init__(self, site: _Optional[str] = ..., client_hello: _Optional[bytes] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("run_id", "server_hello")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_HELLO_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    server_hello: bytes
    def __init__(self, run_id: _Optional[str] = ..., server_hello: _Optional[bytes] = ...) -> None: ...

class Sealed(_message.Message):
    __slots__ = ("site", "sealed")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    site: str
    sealed: bytes
    def __init__(self, site: _Optional[str] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("site", "data")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    site: str
    data: bytes
    def __init__(self, site: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
