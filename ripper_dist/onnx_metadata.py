"""A graph's `metadata_props` read straight from the protobuf wire format, without parsing its weights.

Every process that opens a model (the CLI, the local engine, each Ray actor) first needs its metadata (family,
sources, rates, chunking): `onnx.load_model` parses the whole ModelProto for that, 0.9 s per call for the released
htdemucs (160 MB of initializers; measured under load on the 2-core dev VM). The metadata sits after the graph in the
file (field 14 after field 7), so this scans the top-level fields only, stepping over the graph by its length
prefix; with a path, the file is memory-mapped and only the pages holding field headers and metadata are touched.

The same walk gives `architecture_key`: a digest of what a graph computes but not of its weights, which keys the
per-machine backend measurement (`cpu_backend`). Every process with `--backend auto` (the default) needs it before its
first model call; parsing the graph for it held a second copy of the weights (0.9 GB for the RoFormer vocals model).
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
from pathlib import Path

_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}
# Field numbers of onnx.proto3 used by `architecture_key`.
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
_NODE_KEPT = {1, 2, 4, 7, 8}  # input, output, op_type, domain, overload (not name, doc_string, metadata)
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES, _ATTR_DOC = 5, 6, 10, 11, 22, 23, 13
_TENSOR_KEPT = {1, 2, 8}  # dims, data_type, name: not the values (raw_data, *_data, external_data)
_SPARSE_DIMS = 3


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


def _spans(buf, pos: int, end: int):
    """(field number, wire type, start of the field's tag, start and stop of its payload) for each field in
    buf[pos:end]; a varint's or fixed-width value's payload is its bytes, a length-delimited one's what follows the
    length."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise MetadataError("field number 0")
        if wire == 0:
            body = pos
            _, pos = _varint(buf, pos, end)
        elif wire == 2:
            n, body = _varint(buf, pos, end)
            pos = body + n
            if pos > end:
                raise MetadataError(f"field {field} runs past the end ({pos} > {end} bytes)")
        elif wire in (1, 5):
            body, pos = pos, pos + (8 if wire == 1 else 4)
            if pos > end:
                raise MetadataError("truncated fixed-width field")
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise MetadataError(f"wire type {wire} in field {field}")
        yield field, wire, start, body, pos


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, stop) of a length-delimited payload) for each field in buf[pos:end]."""
    for field, wire, _, body, stop in _spans(buf, pos, end):
        if wire == 0:
            yield field, wire, _varint(buf, body, stop)[0]
        else:
            yield field, wire, (body, stop) if wire == 2 else None


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


@contextlib.contextmanager
def _buffer(model: bytes | str | Path):
    """The serialized model as an indexable buffer: the bytes themselves, or the file memory-mapped."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        yield memoryview(model)
        return
    with open(model, "rb") as f:
        if Path(model).stat().st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield m


def metadata_props(model: bytes | str | Path) -> dict[str, str]:
    """{key: value} of the model's metadata_props, as `{p.key: p.value for p in onnx.load(m).metadata_props}`."""
    with _buffer(model) as buf:
        return _props(buf, len(buf))


def architecture_key(model: bytes | str | Path) -> str:
    """A digest of the graph's operators (types, wiring, attributes), its inputs and outputs, its opsets and the
    names, types and shapes of its weights, but not their values: two checkpoints of one model (a bag's members, a
    fine-tune) share it, any change to what is computed or how large it is does not. Tensor values inside
    attributes (Constant nodes) count as weights; subgraphs (If, Loop) are walked alike."""
    h = hashlib.sha256()
    with _buffer(model) as buf:
        for field, _, start, body, stop in _spans(buf, 0, len(buf)):
            if field == _MODEL_GRAPH:
                _digest_graph(h, buf, body, stop)
            elif field == _MODEL_OPSET:
                h.update(buf[start:stop])
    return h.hexdigest()[:16]


def _mark(h, what: bytes, field: int) -> None:
    h.update(b"<%s%d>" % (what, field))


def _digest_graph(h, buf, pos: int, end: int) -> None:
    _mark(h, b"graph", 0)
    for field, _, start, body, stop in _spans(buf, pos, end):
        if field == _GRAPH_NODE:
            _digest_node(h, buf, body, stop)
        elif field == _GRAPH_INITIALIZER:
            _digest_tensor(h, buf, body, stop, field)
        elif field in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            h.update(buf[start:stop])
        elif field == _GRAPH_SPARSE_INITIALIZER:
            _digest_sparse(h, buf, body, stop, field)
    _mark(h, b"/graph", 0)


def _digest_node(h, buf, pos: int, end: int) -> None:
    _mark(h, b"node", 0)
    for field, _, start, body, stop in _spans(buf, pos, end):
        if field in _NODE_KEPT:
            h.update(buf[start:stop])
        elif field == _NODE_ATTRIBUTE:
            _mark(h, b"attr", 0)
            for f, _, s, b, e in _spans(buf, body, stop):
                if f in (_ATTR_TENSOR, _ATTR_TENSORS):
                    _digest_tensor(h, buf, b, e, f)
                elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
                    _digest_sparse(h, buf, b, e, f)
                elif f in (_ATTR_GRAPH, _ATTR_GRAPHS):
                    _digest_graph(h, buf, b, e)
                elif f != _ATTR_DOC:
                    h.update(buf[s:e])


def _digest_tensor(h, buf, pos: int, end: int, field: int) -> None:
    _mark(h, b"tensor", field)
    for f, _, start, _, stop in _spans(buf, pos, end):
        if f in _TENSOR_KEPT:
            h.update(buf[start:stop])


def _digest_sparse(h, buf, pos: int, end: int, field: int) -> None:
    _mark(h, b"sparse", field)
    for f, _, start, _, stop in _spans(buf, pos, end):
        if f == _SPARSE_DIMS:
            h.update(buf[start:stop])
