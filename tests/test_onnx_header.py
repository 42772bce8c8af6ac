"""zoo_onnx.metadata.read_header and rewrite_metadata: an ONNX file's fields without parsing its
weights, and its zoo metadata replaced in place. Judged against onnx's own load/save on files
built with onnx.helper (weights inline, external, sparse), and on damaged files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoo_onnx.metadata import read_header, read_metadata, rewrite_metadata, set_metadata


def _model(weight_rows: int = 64, sparse: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((weight_rows, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Relu", ["y"], ["logits"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight_rows])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])], [w])
    if sparse:
        values = numpy_helper.from_array(np.array([1.5, -2.0], dtype=np.float32), "s")
        indices = numpy_helper.from_array(np.array([1, 5], dtype=np.int64), "s_idx")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="test")
    model.metadata_props.add(key="other", value="kept")
    set_metadata(model, {"backbone": "example/net", "num_classes": 8, "outputs": ["logits"], "runtimes": ["a", "b"]})
    return model


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.HasField("graph"):
        del out.graph.initializer[:]
        del out.graph.sparse_initializer[:]
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_the_header_is_onnxs_own_parse_less_the_weights(tmp_path, sparse):
    path = tmp_path / "m.onnx"
    onnx.save(_model(4096, sparse=sparse), str(path))  # 128 KiB of weights inline
    full = onnx.load(str(path))
    header = read_header(path)
    assert header == _without_weights(full)
    assert header.SerializeToString() == _without_weights(full).SerializeToString()
    assert len(full.graph.initializer) == 1 and not header.graph.initializer
    assert [o.name for o in header.graph.output] == ["logits"]
    assert read_metadata(path)["backbone"] == "example/net"


def test_the_header_of_a_file_with_external_weights_is_its_graph(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(4096), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert read_header(path) == _without_weights(onnx.load(str(path), load_external_data=False))


@pytest.mark.parametrize("damage", ["empty", "truncated", "not protobuf"])
def test_a_damaged_file_gets_onnxs_own_verdict(tmp_path, damage):
    """Where the wire format does not parse, read_header is onnx.load: the same error, never a
    partial header."""
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not protobuf": b"\xff" * 64}[damage])
    try:
        expected = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx's verdict, whatever it is
        with pytest.raises(type(exc)):
            read_header(path)
    else:
        assert read_header(path) == _without_weights(expected)


def test_rewritten_metadata_is_what_a_full_load_and_save_gives(tmp_path):
    path, control = tmp_path / "m.onnx", tmp_path / "control.onnx"
    onnx.save(_model(4096, sparse=True), str(path))
    onnx.save(_model(4096, sparse=True), str(control))
    new = {"backbone": "example/net", "num_classes": 8, "outputs": ["logits"], "runtimes": ["a"],
           "validated_in": {"a": {"version": "1.0"}}}
    weights_before = path.read_bytes()
    rewrite_metadata(path, new)
    proto = onnx.load(str(control))
    set_metadata(proto, new)
    onnx.save(proto, str(control))

    assert onnx.load(str(path)) == onnx.load(str(control))  # the whole file, weights included
    assert read_metadata(path) == new
    assert {p.key: p.value for p in read_header(path).metadata_props}["other"] == "kept"
    onnx.checker.check_model(str(path), full_check=True)
    # the weights' bytes were copied, not re-encoded
    raw = onnx.load(str(control)).graph.initializer[0].raw_data
    assert raw and raw in path.read_bytes() and raw in weights_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_rewriting_twice_keeps_one_copy_of_the_metadata(tmp_path):
    """Control for the test above: the old doc string and metadata_props are dropped, not kept
    beside the new ones (protobuf would concatenate repeated fields)."""
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    for runtimes in (["a"], ["b"]):
        rewrite_metadata(path, {"backbone": "example/net", "num_classes": 8, "outputs": ["logits"], "runtimes": runtimes})
    keys = [p.key for p in onnx.load(str(path)).metadata_props]
    assert len(keys) == len(set(keys)), keys
    assert read_metadata(path)["runtimes"] == ["b"]
