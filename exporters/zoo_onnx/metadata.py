"""Where ONNX artifacts keep their zoo metadata: `metadata_props`, one "zoo.<field>" entry per
field of `zoo.exporting.artifact_metadata` (JSON-encoded values) plus the whole dict as
"zoo.metadata". `read_metadata` needs onnx or an onnxruntime session only (the torch-free
predictor uses it). `read_header` reads a file's ModelProto without its weights."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METADATA_PREFIX = "zoo."


def set_metadata(model_proto, metadata: dict[str, Any]) -> None:
    """Replace the zoo.* metadata_props with `metadata` (one JSON value per field + the whole)."""
    keep = [(p.key, p.value) for p in model_proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model_proto.metadata_props[:]
    for key, value in keep:
        model_proto.metadata_props.add(key=key, value=value)
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=METADATA_PREFIX + key, value=value if isinstance(value, str) else json.dumps(value))
    model_proto.metadata_props.add(key=METADATA_PREFIX + "metadata", value=json.dumps(metadata))
    model_proto.doc_string = (f"backbone-zoo export of {metadata.get('backbone')} with a {metadata.get('num_classes')}-class "
                              f"head; input {metadata.get('input_description')}; outputs {', '.join(metadata.get('outputs', []))}")


def read_metadata(path_or_session) -> dict[str, Any]:
    """The zoo metadata of an ONNX file or an onnxruntime session ({} when absent)."""
    if hasattr(path_or_session, "get_modelmeta"):
        props = path_or_session.get_modelmeta().custom_metadata_map
    else:
        props = {p.key: p.value for p in read_header(path_or_session).metadata_props}
    raw = props.get(METADATA_PREFIX + "metadata")
    return json.loads(raw) if raw else {}


# onnx.proto field numbers: ModelProto's doc_string, graph and metadata_props; GraphProto's initializers
_DOC_STRING, _GRAPH, _METADATA_PROPS = 6, 7, 14
_INITIALIZER, _SPARSE_INITIALIZER = 5, 15


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _records(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, record start, value start, record end) of each protobuf field in buf[start:end]."""
    pos = start
    while pos < end:
        record = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4): not in onnx.proto
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {record}")
        value = pos if wire != 2 else pos - size
        yield key >> 3, record, value, pos
    if pos != end:
        raise ValueError(f"protobuf field runs past its message (byte {pos} of {end})")


def _key_and_length(field: int, size: int) -> bytes:
    out = bytearray()
    for v in ((field << 3) | 2, size):
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


def read_header(path: str | os.PathLike[str]) -> Any:
    """The file's onnx.ModelProto without its weights: every field as written except the graph's
    initializers (opset, metadata_props, the graph's nodes, inputs and outputs are all there). A
    file's weights are most of its bytes, so this reads a few kilobytes where onnx.load parses them
    all (once per metadata or input-name lookup: a 515 MB VGG-11 took 1.3 s a read). The file is
    mapped, not read: the skipped bytes are never touched."""
    import onnx

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            parts: list[bytes] = []
            for field, record, value, end in _records(buf, 0, len(buf)):
                if field != _GRAPH:
                    parts.append(buf[record:end])
                    continue
                graph = b"".join(buf[r:e] for f_, r, _, e in _records(buf, value, end)
                                 if f_ not in (_INITIALIZER, _SPARSE_INITIALIZER))
                parts.append(_key_and_length(_GRAPH, len(graph)) + graph)
        return onnx.ModelProto.FromString(b"".join(parts))
    except Exception:  # noqa: BLE001 - empty, truncated, not protobuf (a DecodeError): onnx's own verdict
        return onnx.load(str(path), load_external_data=False)


def rewrite_metadata(path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """set_metadata on the file itself, without parsing or re-serializing its weights: every other
    field's bytes are copied as they are and the new doc string and metadata_props follow them
    (protobuf reads fields in any order). What it gives is checked against onnx's own parse of
    those fields before the file is replaced, atomically; a file read_header cannot parse is
    loaded and saved whole, as before."""
    import onnx

    path = Path(path)
    head = read_header(path)
    expected = onnx.ModelProto()
    expected.CopyFrom(head)
    set_metadata(expected, metadata)
    tail = onnx.ModelProto(doc_string=expected.doc_string)
    tail.metadata_props.extend(expected.metadata_props)
    tmp = path.with_name(f".{path.name}.metadata-{os.getpid()}")
    try:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf, \
                    open(tmp, "wb") as out:
                for field, record, _, end in _records(buf, 0, len(buf)):
                    if field not in (_DOC_STRING, _METADATA_PROPS):
                        out.write(buf[record:end])
                out.write(tail.SerializeToString())
        except (ValueError, IndexError):
            proto = onnx.load(str(path))
            set_metadata(proto, metadata)
            onnx.save(proto, str(tmp))
        if read_header(tmp) != expected:
            raise RuntimeError(f"rewriting the metadata of {path} gave a file that reads back differently")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
