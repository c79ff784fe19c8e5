"""A graph's `metadata_props` read straight from the protobuf wire format, without parsing its weights.

Every process that opens a model (the CLI, the local engine, each Ray actor) first needs its metadata (family,
sources, rates, chunking): `onnx.load_model` parses the whole ModelProto for that, 0.9 s per call for the released
htdemucs (160 MB of initializers; measured under load on the 2-core dev VM). The metadata sits after the graph in the
file (field 14 after field 7), so this scans the top-level fields only, stepping over the graph by its length
prefix; with a path, the file is memory-mapped and only the pages holding field headers and metadata are touched.
"""
from __future__ import annotations

import mmap
from pathlib import Path

_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}


class MetadataError(ValueError):
    """The bytes are not a well-formed protobuf message at the top level (truncated or not an ONNX file)."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise MetadataError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise MetadataError("varint longer than 10 bytes")


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, stop) of a length-delimited payload) for each field in buf[pos:end]."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise MetadataError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 1:
            pos += 8
            yield field, wire, None
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise MetadataError(f"field {field} runs past the end ({pos + n} > {end} bytes)")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 5:
            pos += 4
            yield field, wire, None
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise MetadataError(f"wire type {wire} in field {field}")
        if pos > end:
            raise MetadataError("truncated fixed-width field")


def _props(buf, end: int) -> dict[str, str]:
    props: dict[str, str] = {}
    for field, wire, value in _fields(buf, 0, end):
        if field != _METADATA_PROPS or wire != 2:
            continue
        key = val = ""
        for f, w, v in _fields(buf, *value):
            if w == 2 and f in (1, 2):
                text = bytes(buf[v[0]:v[1]]).decode("utf-8")
                key, val = (text, val) if f == 1 else (key, text)
        props[key] = val  # protobuf's own rule for repeated keys: the last one wins in onnx's dict
    return props


def metadata_props(model: bytes | str | Path) -> dict[str, str]:
    """{key: value} of the model's metadata_props, as `{p.key: p.value for p in onnx.load(m).metadata_props}`."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _props(memoryview(model), len(model))
    with open(model, "rb") as f:
        size = Path(model).stat().st_size
        if size == 0:
            return {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _props(m, size)
