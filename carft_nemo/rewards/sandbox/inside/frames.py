"""Length-prefixed JSON frames between the trainer and a sandbox's supervisor (standard library only)."""

import json
import os
import struct

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def read_frame(fd):
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return json.loads(_read_exactly(fd, size) or b"null")


def _read_exactly(fd, size):
    chunks, left = [], size
    while left:
        data = os.read(fd, left)
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def write_frame(fd, obj):
    data = json.dumps(obj).encode()
    data = _HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data) :]
