"""`--preprocess full` in ONNX: the reference eval preprocessing (`zoo.preprocess.resize_crop` +
`normalize_uint8`) as a graph in front of the model, taking uint8 (N, H, W, 3) at any H and W.

Written node by node, not traced, so every rounding rule is the reference's, on integers
(`zoo.preprocess_module` states the same rules for TorchScript):

  size      crop_mode "center" (the only one `zoo.preprocess.in_graph_problem` accepts): shorter
            side -> R, longer -> (R * longer) div shorter (int64 division, truncation, = Python's
            int(R * longer / shorter) at image sizes)
  resample  Resize (opset 18) with antialias=1, half_pixel coordinates and exclude_outside=1
            (Pillow's renormalized, scale-widened filter; cubic_coeff_a -0.5 like Pillow's
            bicubic): first the width, then the height, each rounded half up (Floor(x + 0.5))
            and clipped to 0..255, as Pillow's 8-bit two-pass resampling does; an image already
            at the size passes unchanged (a half-pixel resize at scale 1 is the identity)
  crop      offset = q + (d mod 2) * (q mod 2), d = size - crop, q = d div 2: round(d / 2) with
            halves to even, like Python's round() in `zoo.preprocess.crop_offset`
  scale     x / 255, then (x - mean) / std: normalize_uint8's float ops in its order

Measured against Pillow on scikit-image's photos and odd sizes in ONNX Runtime: at most 1 uint8
level, on under 0.2% of the pixels.
"""

from __future__ import annotations

import numpy as np

PREFIX = "zoo_preprocess/"
MIN_OPSET = 18  # Resize's antialias attribute


def preprocess_graph(norm, opset: int, input_name: str = "image", output_name: str = "pixels"):
    """-> onnx.ModelProto: uint8 (N, H, W, 3) `input_name` -> float32 (N, 3, crop_h, crop_w)
    `output_name`, normalized."""
    from onnx import TensorProto, helper, numpy_helper

    resize, (c, out_h, out_w) = int(norm.resize_size), tuple(int(v) for v in norm.input_size)
    nodes, inits = [], []

    def const(name, value, dtype=np.int64):
        if PREFIX + name not in {i.name for i in inits}:  # one initializer per name ("2" is an end and a start)
            inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), PREFIX + name))
        return PREFIX + name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [PREFIX + name], name=PREFIX + name, **attrs))
        return PREFIX + name

    # -- the image as float NCHW, and its size -------------------------------------------------------
    x = node("Transpose", [node("Cast", [input_name], "float", to=TensorProto.FLOAT)], "nchw", perm=[0, 3, 1, 2])
    shape = node("Shape", [x], "shape")
    nc = node("Slice", [shape, const("0", [0]), const("2", [2])], "n_c")
    h = node("Slice", [shape, const("2", [2]), const("3", [3])], "h")
    w = node("Slice", [shape, const("3", [3]), const("4", [4])], "w")

    # -- the resized size ------------------------------------------------------------------------------
    r = const("resize", [resize])
    portrait = node("LessOrEqual", [w, h], "w_le_h")
    new_h = node("Where", [portrait, node("Div", [node("Mul", [r, h], "r_h"), w], "r_h_div_w"), r], "new_h")
    new_w = node("Where", [portrait, r, node("Div", [node("Mul", [r, w], "r_w"), h], "r_w_div_h")], "new_w")

    # -- two resampling passes, width then height, each rounded like Pillow's 8-bit result -------------
    attrs = dict(mode="cubic" if norm.interpolation == "bicubic" else "linear", antialias=1,
                 coordinate_transformation_mode="half_pixel", exclude_outside=1)
    if norm.interpolation == "bicubic":
        attrs["cubic_coeff_a"] = -0.5
    half, lo, hi = (const(n, v, np.float32) for n, v in (("half", 0.5), ("lo", 0.0), ("hi", 255.0)))
    for i, sizes in enumerate(([nc, h, new_w], [nc, new_h, new_w])):
        target = node("Concat", sizes, f"sizes{i}", axis=0)
        x = node("Resize", [x, "", "", target], f"resize{i}", **attrs)
        x = node("Clip", [node("Floor", [node("Add", [x, half], f"plus_half{i}")], f"round{i}"), lo, hi], f"uint8_{i}")

    # -- center crop: offsets rounded half to even -------------------------------------------------------
    two = const("two", [2])

    def offset(size, out, tag):
        d = node("Sub", [size, const(f"crop_{tag}", [out])], f"margin_{tag}")
        q = node("Div", [d, two], f"half_margin_{tag}")
        odd = node("Mul", [node("Mod", [d, two], f"d_odd_{tag}"), node("Mod", [q, two], f"q_odd_{tag}")], f"up_{tag}")
        return node("Add", [q, odd], f"offset_{tag}")

    starts = node("Concat", [offset(new_h, out_h, "h"), offset(new_w, out_w, "w")], "crop_starts", axis=0)
    ends = node("Add", [starts, const("crop_size", [out_h, out_w])], "crop_ends")
    x = node("Slice", [x, starts, ends, const("axes", [2, 3])], "crop")

    # -- scale and normalize -------------------------------------------------------------------------------
    x = node("Div", [x, const("255", 255.0, np.float32)], "scaled")
    mean = const("mean", np.asarray(norm.mean, np.float32).reshape(1, -1, 1, 1), np.float32)
    std = const("std", np.asarray(norm.std, np.float32).reshape(1, -1, 1, 1), np.float32)
    x = node("Div", [node("Sub", [x, mean], "centered"), std], "normalized")
    nodes.append(helper.make_node("Identity", [x], [output_name], name=PREFIX + "out"))

    graph = helper.make_graph(
        nodes, "zoo_preprocess",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", "height", "width", c])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", c, out_h, out_w])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def prepend(proto, norm, input_name: str = "image"):
    """The model `proto` (float NCHW input at the crop size) with the preprocessing graph in
    front: one graph taking uint8 (N, H, W, 3) at any size. Metadata and outputs are the model's."""
    import onnx
    from onnx import compose

    from zoo.errors import ZooError

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise ZooError(f"--preprocess full needs ONNX opset >= {MIN_OPSET} (antialiased Resize); got opset {opset}")
    pre = preprocess_graph(norm, opset, input_name)
    pre.ir_version = proto.ir_version
    # the model's other opset domains (if any) must be declared on both sides for merge_models
    pre.opset_import.extend(o for o in proto.opset_import if o.domain not in ("", "ai.onnx"))
    model_input = proto.graph.input[0].name
    merged = compose.merge_models(pre, proto, io_map=[("pixels", model_input)], doc_string=proto.doc_string)
    del merged.metadata_props[:]
    merged.metadata_props.extend(proto.metadata_props)
    onnx.checker.check_model(merged, full_check=True)
    return merged
