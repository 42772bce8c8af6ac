"""Deployment targets for the ONNX export: what each runtime accepts, how a graph is made to fit
it, and running the artifact *in* that runtime for validation.

    onnxruntime  the default; accepts everything the exporters write (int8 QDQ included)
    openvino     OpenVINO's CPU plugin (`pip install backbone-zoo[openvino]`); int8 QDQ included; the
                 export also writes OpenVINO IR (model.xml/.bin, openvino_ir.py), validated at defaults
    opencv       OpenCV DNN's ONNX importer (`pip install backbone-zoo[opencv]`), 4.x and 5.x; fp32

Why a profile, not just "export and hope": the TorchScript-based exporter writes shape-dependent
code as run-time subgraphs. timm's tf_* models pad "SAME" from the input size
(Shape -> Gather -> Cast -> Div -> Ceil -> ... -> Clip -> Pad, ~600 nodes in lite0), and OpenCV
4.x's importer cannot even parse that (it fails at the first Clip fed by a shape computation).
For a fixed input size those values are constants: `fold_static_shapes` evaluates every node
whose inputs are known once H and W are (the batch axis stays dynamic), then folds the
resulting constant zero-`Pad` into the following convolution's `pads`. The result is the graph
the model means -- plain Conv/Clip/Add -- which every runtime loads.

`profile_problems` then checks the folded graph against the target: ops it rejects, inputs it
needs constant (pads, shapes, clip bounds), and elementwise ops with mixed input types (the
dynamo exporter writes some). An artifact with problems is refused before any runtime sees it,
with a message naming the node and the way out.

Nothing here imports torch: it reads and rewrites `onnx.ModelProto`s and runs finished files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from zoo.errors import ZooError

TARGETS = ("onnxruntime", "openvino", "opencv")
DEFAULT_TARGET = "onnxruntime"

# Elementwise ops whose inputs must share one element type (ONNX says so; some runtimes check).
_SAME_TYPE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
                  "LessOrEqual", "GreaterOrEqual", "Concat"}
# Nodes never folded even with constant inputs (non-deterministic).
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
MAX_FOLDED_ELEMENTS = 1 << 16  # a folded value larger than this stays computed (keeps the file small)


@dataclass(frozen=True)
class TargetProfile:
    """What one runtime accepts."""

    name: str
    runtime: str  # the Python module that runs it
    extra: str  # pip extra that installs it
    int8: bool  # runs QDQ int8 graphs
    static_shapes: bool  # needs shape-dependent subgraphs folded (no Shape/Ceil/... at run time)
    rejected_ops: frozenset = frozenset()
    # op -> indices of inputs that must be constant (initializers) for the target's importer
    constant_inputs: dict = field(default_factory=dict)
    dynamic_size: bool = True  # accepts dynamic height/width
    # why `--preprocess full` (antialiased Resize on any-size input) is refused for it; None: accepted
    full_preprocess: str | None = None

    @property
    def install_hint(self) -> str:
        return f"pip install 'backbone-zoo[{self.extra}]'"


PROFILES: dict[str, TargetProfile] = {
    "onnxruntime": TargetProfile("onnxruntime", "onnxruntime", "onnxruntime", int8=True, static_shapes=False),
    "openvino": TargetProfile("openvino", "openvino", "openvino", int8=True, static_shapes=True,
                              full_preprocess="OpenVINO's ONNX Resize ignores antialias=1 when it reduces (measured with "
                              "openvino 2026.4: up to 80 uint8 levels from Pillow's resize on photos), so the "
                              "in-graph resize would not be the reference's",
                              rejected_ops=frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})),
    "opencv": TargetProfile(
        "opencv", "cv2", "opencv", int8=False, static_shapes=True, dynamic_size=False,
        full_preprocess="OpenCV DNN runs graphs with a fixed input size only, and has no antialiased Resize",
        rejected_ops=frozenset({"Shape", "Ceil", "Floor", "If", "Loop", "Scan", "NonZero", "Range", "NonMaxSuppression",
                                "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear",
                                "DequantizeLinear"}),
        constant_inputs={"Pad": (1, 2), "Clip": (1, 2), "Reshape": (1,), "Resize": (1, 2, 3), "Expand": (1,),
                         "Tile": (1,), "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,),
                         "ConstantOfShape": (0,)}),
}


def check_full_preprocess(target: str) -> None:
    """ZooError, before anything is exported, when the target cannot run `--preprocess full`."""
    reason = profile(target).full_preprocess
    if reason:
        raise ZooError(f"--preprocess full cannot target {target}: {reason}. Export for {target} with --preprocess "
                       "normalize and resize with Pillow as the metadata's \"resize\" recipe says, or export "
                       "--preprocess full for --target onnxruntime")


def profile(target: str | None) -> TargetProfile:
    name = target or DEFAULT_TARGET
    if name not in PROFILES:
        raise ZooError(f"unknown deployment target {name!r}: choose one of {', '.join(TARGETS)}")
    return PROFILES[name]


# -- making a graph fit -----------------------------------------------------------------------------
def _static_dims(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


# Shape inference keeps the data of initializers at most this large (and of every integer one): the
# values it reads (Reshape's shape, Slice's starts, Pad's pads, ...) are small; the weights are not.
INFER_DATA_ELEMENTS = 1 << 12
_FLOAT_TYPES = {1, 10, 11, 16}  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def infer_shapes(proto):
    """`onnx.shape_inference.infer_shapes` on the graph with its large float initializers declared
    by type and shape instead of carried as data: the same inferred types and shapes, without
    serializing the weights into the inference and back (for VGG-11, 0.5 GB, 2.6 s a call).
    Returns the inferred *light* model: read its value_info, not its weights."""
    import onnx
    from onnx import helper, shape_inference

    g = proto.graph
    big = [i for i in g.initializer
           if i.data_type in _FLOAT_TYPES and int(np.prod(i.dims, dtype=np.int64)) > INFER_DATA_ELEMENTS]
    if not big:
        return shape_inference.infer_shapes(proto)
    stripped = {i.name for i in big}
    declared = {i.name for i in g.input}  # IR < 4 lists initializers as inputs too: declare each once
    graph = helper.make_graph(
        list(g.node), g.name,
        [*g.input, *(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in big
                     if i.name not in declared)],
        list(g.output), [i for i in g.initializer if i.name not in stripped], value_info=list(g.value_info))
    light = onnx.ModelProto(ir_version=proto.ir_version, graph=graph)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    return shape_inference.infer_shapes(light)


class _Consts(dict):
    """name -> known value; the graph's initializers are converted to arrays only when one is read
    (most are weights no folded node reads)."""

    def __init__(self, initializers):
        super().__init__()
        self.tensors = {i.name: i for i in initializers}

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self.tensors

    def __missing__(self, name):
        from onnx import numpy_helper

        value = self[name] = numpy_helper.to_array(self.tensors[name])
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default


def _eval_node(node, inputs: list[np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(node, opsets={"": opset})
    names = [n for n in node.input if n]
    return ref.run(None, dict(zip(names, inputs)))


def fold_static_shapes(proto, opset: int | None = None, max_rounds: int = 64):
    """Evaluate every node whose value is fixed once the non-batch dims are (shape arithmetic on
    static H/W, constant subexpressions), drop what became dead, and fold constant zero-Pads into
    the Conv after them. Returns a new ModelProto; the graph's inputs and outputs are unchanged.

    Repeated to a fixed point: a folded Pad gives shape inference the static size of the tensor
    after it, which lets the next block's padding fold in the next round."""
    for _ in range(max_rounds):
        before = len(proto.graph.node)
        proto = _fold_once(proto, opset)
        if len(proto.graph.node) == before:
            break
    return proto


def _fold_once(proto, opset: int | None):
    import onnx
    from onnx import helper, numpy_helper

    opset = opset or next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    inferred = infer_shapes(proto)
    infos = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    consts = _Consts(proto.graph.initializer)
    partial: dict[str, list[int | None]] = {}  # Shape outputs with some (e.g. batch) dims unknown

    # Phase 1: walk in topological order, evaluating what is known.
    kept = []
    for node in proto.graph.node:
        ins = [n for n in node.input if n]
        if node.op_type == "Constant":
            consts[node.output[0]] = _eval_node(node, [], opset)[0]
            continue
        if node.op_type == "Shape" and node.input[0] in infos:
            dims = _static_dims(infos[node.input[0]])
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dims = dims[attrs.get("start", 0):attrs.get("end", len(dims))] if dims else dims
            if dims and all(d is not None for d in dims):
                consts[node.output[0]] = np.array(dims, dtype=np.int64)
                continue
            if dims:
                partial[node.output[0]] = dims
        if (node.op_type == "Gather" and node.input[0] in partial and node.input[1] in consts
                and not any(a.name == "axis" and a.i != 0 for a in node.attribute)):
            dims = partial[node.input[0]]
            idx = consts[node.input[1]]
            picked = [dims[int(i)] for i in np.atleast_1d(idx)]
            if all(d is not None for d in picked):
                consts[node.output[0]] = np.array(picked if idx.ndim else picked[0], dtype=np.int64)
                continue
        if node.domain in ("", "ai.onnx") and node.op_type not in _NO_FOLD and ins and all(n in consts for n in ins):
            try:
                outs = _eval_node(node, [consts[n] for n in ins], opset)
            except Exception:  # noqa: BLE001 - anything the reference evaluator cannot run stays a node
                kept.append(node)
                continue
            if sum(np.asarray(v).size for v in outs) > MAX_FOLDED_ELEMENTS and node.op_type not in ("Transpose", "Reshape"):
                kept.append(node)
                continue
            consts.update({name: np.asarray(v) for name, v in zip(node.output, outs)})
            continue
        kept.append(node)

    # Phase 2: fold constant zero Pad into the single Conv that consumes it.
    consumers: dict[str, list] = {}
    for node in kept:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}
    folded_pads = set()
    for node in kept:
        if node.op_type != "Pad" or node.input[1] not in consts:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"constant")
        value = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        users = consumers.get(node.output[0], [])
        if (mode not in (b"constant", "constant") or value is None or np.any(value != 0) or len(users) != 1
                or users[0].op_type != "Conv" or node.output[0] in graph_outputs or len(node.input) > 3):
            continue
        pads = consts[node.input[1]].astype(int).tolist()
        rank = len(pads) // 2
        if rank != 4 or any(pads[i] or pads[i + rank] for i in (0, 1)):
            continue  # padding the batch or channel axes is not a convolution's padding
        conv = users[0]
        cattrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if cattrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(cattrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = node.input[0]
        folded_pads.add(id(node))
    kept = [n for n in kept if id(n) not in folded_pads]

    # Phase 3: drop dead nodes; constants still used become initializers.
    needed = set(graph_outputs)
    live = []
    for node in reversed(kept):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(n for n in node.input if n)
    live.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(live)
    del out.graph.initializer[:]
    graph_inputs = {i.name for i in proto.graph.input}
    for name in [n for n in consts.tensors if n in needed and n not in graph_inputs]:
        out.graph.initializer.append(consts.tensors[name])  # an initializer kept as it was (not re-encoded)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()
                                 if name in needed and name not in graph_inputs and name not in consts.tensors)
    for out_name in graph_outputs & (set(consts) | set(consts.tensors)):  # an output that is a constant
        raise ZooError(f"graph output {out_name!r} folded to a constant: the model ignores its input")
    del out.graph.value_info[:]
    return out


def profile_problems(proto, target: str) -> list[str]:
    """What in this graph the target's runtime rejects (empty: nothing known)."""
    prof = profile(target)
    problems: list[str] = []
    initializers = {i.name for i in proto.graph.initializer}
    inferred = infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    for node in proto.graph.node:
        where = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if node.op_type in prof.rejected_ops:
            problems.append(f"{where}: {prof.name} does not run {node.op_type}")
        for i in prof.constant_inputs.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in initializers:
                problems.append(f"{where}: {prof.name} needs input {i} ({node.input[i]!r}) to be a constant")
        if node.op_type in _SAME_TYPE_OPS:
            seen = {types.get(n) for n in node.input if n}
            if len(seen - {None}) > 1:
                problems.append(f"{where}: mixed input types {sorted(seen - {None})} ({prof.name} needs one type)")
    return problems


def check_profile(proto, target: str, what: str = "the graph") -> None:
    problems = profile_problems(proto, target)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ZooError(f"{what} is not loadable by the {target} target: {shown}. Export for another target "
                       f"(--target onnxruntime), or without --dynamic-size, where the backbone needs run-time shapes")


# -- running an artifact in its runtime ---------------------------------------------------------------
def import_runtime(target: str):
    """The target's runtime module, or a clear error naming the extra that installs it."""
    prof = profile(target)
    try:  # spelled out (not importlib) so the dependency audit sees each optional runtime
        if prof.runtime == "openvino":
            import openvino as runtime
        elif prof.runtime == "cv2":
            import cv2 as runtime
        else:
            import onnxruntime as runtime
        return runtime
    except ImportError as exc:
        raise ZooError(f"the {target} runtime is not installed ({prof.runtime}: {exc}), so the artifact cannot be "
                       f"validated in it: {prof.install_hint}, or pass --no-validate-target to skip that check "
                       "(the artifact is then marked as not validated in its target)") from exc


def runtime_version(target: str) -> str:
    return f"{profile(target).runtime} {getattr(import_runtime(target), '__version__', '?')}"


def runner(target: str, path) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], list[str]]:
    """(fn(batch) -> {output name: array}, output names) running the file in the target runtime."""
    from .metadata import read_header

    graph = read_header(path).graph
    names, input_name = [o.name for o in graph.output], graph.input[0].name
    del graph
    mod = import_runtime(target)
    if target == "onnxruntime":
        so = mod.SessionOptions()
        so.graph_optimization_level = mod.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        sess = mod.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return (lambda b: dict(zip(names, sess.run(None, {input_name: b})))), names
    if target == "openvino":  # as a consumer calls it: compile_model(file, "CPU"), no configuration
        from .openvino_ir import ir_runner

        run_ov, _ = ir_runner(path)
        return run_ov, names
    if target == "opencv":
        net = mod.dnn.readNetFromONNX(str(path))

        def run_cv(b):
            net.setInput(np.ascontiguousarray(b))
            outs = net.forward(names)
            return {name: np.array(o) for name, o in zip(names, outs)}

        return run_cv, names
    raise ZooError(f"no runner for target {target!r}")


# -- validating in the target -------------------------------------------------------------------------
def second_size(input_size) -> tuple[int, int]:
    """The other (H, W) a --dynamic-size export is verified at: larger by a quarter, a multiple of 32."""
    _, h, w = tuple(input_size)
    return (h + max(32, (h // 4) // 32 * 32), w + max(32, (w // 4) // 32 * 32))


def resized_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 NHWC images resized to `size` (H, W) with PIL's antialiased bilinear resize."""
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.Resampling.BILINEAR)) for p in pixels])


def validate_in_target(model, path, images, *, target: str = DEFAULT_TARGET, reference=None, tolerance=None,
                       batch_sizes=(1, 3, 8), preprocess: str = "normalize", targets=None, kind: str = "fp32",
                       dynamic_size: bool = False, **_: Any) -> dict[str, Any]:
    """Run the file in the target's runtime at each batch size and compare with eager PyTorch
    (zoo.validation's criteria); with dynamic_size, also at a second input size. Fail-closed:
    a runtime that is absent, or that cannot load the file, fails the validation."""
    from zoo.validation import (compare, compare_full, eager_outputs, metadata_problems, model_inputs, run_full,
                                run_in_batches)

    from . import read_header, read_metadata

    norm = model.meta.normalization
    try:
        run, _ = runner(target, path)
    except ZooError as exc:
        return {"passed": False, "target": target, "problems": [str(exc)]}
    def verdict(judge):
        """judge(fn, kind) -> report on `run`; OpenVINO at its defaults, judged at the precision it used."""
        if target == "openvino" and kind == "fp32":
            from .openvino_ir import ir_runner, judge_openvino

            return judge_openvino(lambda config: ir_runner(path, config), judge)
        return judge(run, kind)

    if preprocess == "full":  # images at their own sizes, one at a time and in same-size batches
        report = compare_full(reference, run_full(run, images), tolerance, targets, getattr(images, "names", None))
    else:
        reference = reference if reference is not None else eager_outputs(model, images)
        x = model_inputs(images, norm, preprocess)

        def judge(fn, judged_kind):
            return compare(reference, run_in_batches(fn, x, batch_sizes), tolerance, kind=judged_kind, targets=targets)

        report = verdict(judge)
    problems = list(report["problems"])
    if dynamic_size:
        size = second_size(norm.input_size)
        other = resized_pixels(images, size)
        ref2, x2 = eager_outputs(model, other), model_inputs(other, norm, preprocess)

        def judge2(fn, judged_kind):
            return compare(ref2, run_in_batches(fn, x2, (1, 3)), tolerance, kind=judged_kind)

        rep2 = verdict(judge2)  # the second size judged like the first (bf16 defaults on some CPUs)
        report["second_size"] = {"size": list(size), **{k: rep2[k] for k in ("passed", "max_abs_logit_diff",
                                                                             "top1_agreement", "min_embedding_cosine",
                                                                             "precision", "at_f32") if k in rep2}}
        problems += [f"at {size[0]}x{size[1]}: {p}" for p in rep2["problems"]]
    meta = read_metadata(path)
    problems += metadata_problems(meta, model, preprocess)
    if target not in (meta.get("runtimes") or [target]):
        problems.append(f"metadata runtimes {meta.get('runtimes')} do not include the target {target!r}")
    graph = read_header(path).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    report["dynamic_batch"] = bool(batch_dim.dim_param) and not batch_dim.HasField("dim_value")
    if not report["dynamic_batch"]:
        problems.append(f"input batch axis is fixed at {batch_dim.dim_value}")
    report.update(passed=not problems, problems=problems, target=target, runtime=runtime_version(target))
    return report
