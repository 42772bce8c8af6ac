"""Where ONNX artifacts keep their zoo metadata: `metadata_props`, one "zoo.<field>" entry per
field of `zoo.exporting.artifact_metadata` (JSON-encoded values) plus the whole dict as
"zoo.metadata". `read_metadata` needs onnx or an onnxruntime session only (the torch-free
predictor uses it)."""

from __future__ import annotations

import json
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
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path_or_session), load_external_data=False).metadata_props}
    raw = props.get(METADATA_PREFIX + "metadata")
    return json.loads(raw) if raw else {}
