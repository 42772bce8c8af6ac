"""What the exported files are: self-describing, dynamic-batch, loadable without the zoo, and
guarded by a validation that fails closed (corrupted weights, frozen batch axis, tight tolerance)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zoo
from test_export_support import LABELS, onnx_initializer_perturbed, tiny_model
from zoo.errors import ExportValidationError
from zoo.validation import Tolerance, eager_outputs, load_validation_images

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.* deprecation notices


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One resnet18 (64 px, trained head) exported to every built-in format, int8 included."""
    root = tmp_path_factory.mktemp("exported")
    model = tiny_model("torchvision/resnet18", size=SIZE)
    report = zoo.export(model, formats="all", out=root / "out", quantize="int8")
    return model, root / "out", report


@pytest.fixture(scope="module")
def images(exported):
    model = exported[0]
    return load_validation_images(None, model.meta.normalization, model.meta.labels).pixels


def test_report_lists_every_format_with_numbers(exported):
    model, out, report = exported
    assert report["status"] == "passed"
    assert list(report["artifacts"]) == ["onnx", "onnx-int8", "pt2", "torchscript"]
    on_disk = json.loads((out / "export-report.json").read_text())
    assert on_disk["status"] == "passed" and on_disk["images"]["count"] == 8
    for name, art in on_disk["artifacts"].items():
        v = art["validation"]
        assert isinstance(v["max_abs_logit_diff"], float) and isinstance(v["top1_agreement"], float)
        assert isinstance(v["min_embedding_cosine"], float)
        suffix = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}[name]
        assert art["sha256"] == hashlib.sha256((out / f"model{suffix}").read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "export-report.json", "model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json",
        "model.torchscript.pt", "model.torchscript.pt.json", "model.pt2", "model.pt2.json"])


def test_onnx_graph_io_checker_and_metadata(exported):
    import onnx

    model, out, report = exported
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", SIZE, SIZE, 3]  # NHWC uint8, batch symbolic
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "embedding"]
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["zoo.metadata"])
    norm = model.meta.normalization
    assert json.loads(props["zoo.labels"]) == list(LABELS) == meta["labels"]
    assert meta["mean"] == list(norm.mean) and meta["std"] == list(norm.std)
    assert meta["input_size"] == [3, SIZE, SIZE] and meta["resize_size"] == SIZE + 8
    assert meta["interpolation"] == "bilinear" and meta["crop_mode"] == "center"
    assert meta["backbone"] == "torchvision/resnet18" and meta["weights"] is None
    assert meta["preprocess"] == "normalize" and meta["input_layout"] == "NHWC" and meta["input_dtype"] == "uint8"
    assert {"zoo", "torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    assert meta["versions"]["zoo"] == zoo.__version__
    assert props["zoo.preprocess"] == "normalize" and props["zoo.opset"] == "18"
    sidecar = json.loads((out / "model.onnx.json").read_text())
    assert {k: v for k, v in sidecar.items() if k in meta} == meta
    assert sidecar["validation"]["passed"] is True


def test_onnx_dynamic_batch_matches_eager_at_1_3_8(exported, images):
    import onnxruntime as ort

    model, out, _ = exported
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = eager_outputs(model, images)
    for bs in (1, 3, 8):
        logits, probs, emb = sess.run(None, {"image": images[:bs]})
        assert logits.shape == (bs, len(LABELS)) and emb.shape == (bs, model.meta.feature_dim)
        np.testing.assert_allclose(logits, ref["logits"][:bs], atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_torchscript_loads_with_plain_torch_in_a_process_without_zoo(exported, images, tmp_path):
    model, out, _ = exported
    np.save(tmp_path / "x.npy", images[:3])
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        extra = {{"zoo_metadata.json": "", "labels.txt": ""}}
        m = torch.jit.load({str(out / "model.torchscript.pt")!r}, _extra_files=extra)
        logits, probs, emb = m(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "logits.npy")!r}, logits.numpy())
        assert not any(n == "zoo" or n.startswith("zoo.") or n.startswith("zoo_") for n in sys.modules), "zoo imported"
        text = {{k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}}
        print(json.dumps({{"meta": json.loads(text["zoo_metadata.json"]), "labels": text["labels.txt"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["labels"].split() == list(LABELS)
    assert payload["meta"]["labels"] == list(LABELS) and payload["meta"]["preprocess"] == "normalize"
    assert payload["meta"]["mean"] == list(model.meta.normalization.mean)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), eager_outputs(model, images[:3])["logits"], atol=1e-4)


def test_int8_quantized_and_reported_with_its_own_tolerance(exported):
    import onnx

    _, out, report = exported
    art = report["artifacts"]["onnx-int8"]
    v = art["validation"]
    assert art["status"] == "passed" and v["kind"] == "int8"
    assert v["top1_agreement"] >= Tolerance().int8_agreement
    assert v["agreement_delta"] == pytest.approx(1.0 - v["top1_agreement"])
    assert (out / "model.int8.onnx").stat().st_size < 0.35 * (out / "model.onnx").stat().st_size
    assert art["export"]["value"]["size_ratio"] < 0.35  # convolutions quantized too: the bulk of the weights
    props = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert json.loads(props["zoo.metadata"])["format"] == "onnx-int8"


def test_corrupted_onnx_weights_are_caught(exported, images, tmp_path):
    import onnx
    from onnx import numpy_helper
    from zoo_onnx import validate_onnx

    model, out, _ = exported
    bad = tmp_path / "bad.onnx"
    name = onnx_initializer_perturbed(out / "model.onnx", bad)  # the largest float initializer
    before = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    after = {t.name: t for t in onnx.load(str(bad)).graph.initializer}
    changed = [n for n in before if not np.array_equal(numpy_helper.to_array(before[n]), numpy_helper.to_array(after[n]))]
    assert changed == [name] and numpy_helper.to_array(after[name]).size >= 512 * 512  # a real weight tensor
    report = validate_onnx(model, bad, images)
    assert report["passed"] is False
    assert report["max_abs_logit_diff"] > 1e-4
    assert any("logit diff" in p for p in report["problems"])
    # the untouched file passes the very same check
    assert validate_onnx(model, out / "model.onnx", images)["passed"] is True


def test_corrupted_torchscript_parameter_is_caught(exported, images, tmp_path):
    import torch

    from zoo_torchscript import export_torchscript, validate_torchscript

    model, _, _ = exported
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.backbone.layer4[1].conv2.weight.mul_(1.5)
    export_torchscript(broken, tmp_path / "bad.pt")
    report = validate_torchscript(model, tmp_path / "bad.pt", images, batch_sizes=(8,))
    assert report["passed"] is False and report["max_abs_logit_diff"] > 1e-4


def _patched_onnx_export(monkeypatch, exported, mutate):
    """Make the registered `onnx` exporter write the good file, then `mutate` it."""
    from zoo.plugin import registry

    reg = registry.exporters()
    spec = reg.get("onnx")
    good = exported[1] / "model.onnx"

    class Mutated(type(spec)):
        def export(self, model, path, options):
            mutate(good, path)
            return {"metadata": {"mutated": True}}

    monkeypatch.setitem(reg._exporters, "onnx", (Mutated(), reg.owner("onnx")))


def test_failed_validation_keeps_the_previous_artifact_and_reports_numbers(exported, tmp_path, monkeypatch):
    model = exported[0]
    _patched_onnx_export(monkeypatch, exported, lambda good, path: onnx_initializer_perturbed(good, path))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier validated export")  # the user's: must survive, unchanged
    (out / "model.onnx.json").write_text("{}")
    with pytest.raises(ExportValidationError) as info:
        zoo.export(model, formats="onnx", out=out, quantize="int8")
    assert info.value.exit_code == 3
    assert "onnx" in str(info.value) and "logit diff" in str(info.value) and "earlier export is kept" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["export-report.json", "model.onnx", "model.onnx.json"]
    assert (out / "model.onnx").read_bytes() == b"an earlier validated export"
    report = json.loads((out / "export-report.json").read_text())
    assert report["status"] == "failed"
    entry = report["artifacts"]["onnx"]
    assert entry["status"] == "failed" and entry["path"] is None
    assert entry["previous"]["kept"] is True and "not this one" in entry["previous"]["note"]
    assert entry["validation"]["max_abs_logit_diff"] > 1e-4 and entry["validation"]["logit_diff_to_bound"] > 1
    assert report["artifacts"]["onnx-int8"]["status"] == "skipped"
    assert info.value.report["status"] == "failed"


def test_stale_staging_is_swept_and_a_live_one_kept(exported, tmp_path):
    from zoo.exporting.run import sweep_staging

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".model.onnx.{int(dead.stdout)}.abc{'.staging'}"
    old_style = out / ".model.pt2.xyz.staging"  # written before the pid was in the name
    live = out / f".model.onnx.{os.getppid()}.def.staging"
    for d in (stale, old_style, live):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x" * 1000)
    assert sorted(sweep_staging(out)) == sorted([stale.name, old_style.name])
    assert live.exists() and not stale.exists() and not old_style.exists()


def test_sigint_during_export_leaves_no_staging(exported, tmp_path):
    """Ctrl-C while an exporter runs: the staging folder goes, the earlier artifact stays, exit 130."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.torchscript.pt").write_bytes(b"earlier")
    run = tmp_path / "run"
    from zoo.model import save_model

    save_model(exported[0], run)
    script = textwrap.dedent(f"""
        import os, signal, sys
        # Python installs this handler at start-up unless SIGINT came in ignored (a test run
        # started in the background, `nohup ... &`), where Ctrl-C would not reach an export anyway
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import zoo_torchscript
        real = zoo_torchscript.TorchScript.export
        def slow(self, model, path, options):
            open(path, "wb").write(b"half-written")
            print("STAGED", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers
            import time; time.sleep(30)
        zoo_torchscript.TorchScript.export = slow
        from zoo.cli.main import main
        sys.exit(main(["export", {str(run)!r}, "--format", "torchscript", "--out", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "STAGED" in proc.stderr, proc.stderr
    assert proc.returncode == 130, proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".staging")]
    assert (out / "model.torchscript.pt").read_bytes() == b"earlier"
    assert json.loads((out / "export-report.json").read_text())["status"] == "interrupted"


def test_unreadable_validation_images_are_listed_and_skipped_or_refused_with_strict(exported, tmp_path):
    from PIL import Image

    from zoo.errors import DataError

    model = exported[0]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 70), (40 * i, 90, 200)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    report = zoo.export(model, formats="onnx", out=tmp_path / "a", images=folder, batch_sizes=(1, 3))
    imgs = report["images"]
    assert imgs["count"] == 3 and len(imgs["skipped"]) == 1 and "broken.jpg" in imgs["skipped"][0]
    with pytest.raises(DataError, match="broken.jpg") as info:
        zoo.export(model, formats="onnx", out=tmp_path / "b", images=folder, strict=True)
    assert info.value.exit_code == 2 and "--strict" in str(info.value)
    assert not (tmp_path / "b" / "model.onnx").exists()


def test_frozen_batch_axis_fails_closed(exported, tmp_path, monkeypatch):
    import onnx

    def freeze_batch(good, path):
        proto = onnx.load(str(good))
        for value in [*proto.graph.input, *proto.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_value = 2
        onnx.save(proto, str(path))

    _patched_onnx_export(monkeypatch, exported, freeze_batch)
    with pytest.raises(ExportValidationError):
        zoo.export(exported[0], formats="onnx", out=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "export-report.json").read_text())
    problems = " ".join(report["artifacts"]["onnx"]["validation"]["problems"])
    assert "running the artifact failed" in problems
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_tolerance_is_configurable(exported, images):
    from zoo_onnx import validate_onnx

    model, out, report = exported
    v = report["artifacts"]["onnx"]["validation"]
    diff = v["max_abs_logit_diff"]
    assert 0 < diff and 0 < v["logit_diff_to_bound"] <= 1 and "max|eager logit|" in v["rule"]
    tight = validate_onnx(model, out / "model.onnx", images, tolerance=Tolerance(logits=diff / 10, logits_rtol=0))
    assert tight["passed"] is False and tight["logit_diff_to_bound"] > 1
    assert validate_onnx(model, out / "model.onnx", images, tolerance=Tolerance(logits=diff * 2, logits_rtol=0))["passed"]


def test_scale_aware_bound_separates_float_noise_from_a_wrong_export():
    """Per batch: |d| <= atol + rtol x max|eager logit| of the rows run together. Relative float
    noise on large logits passes; a 1e-3 relative error, or a small error on small logits, fails."""
    from zoo.validation import compare
    from zoo.validation.compare import logit_bounds

    rng = np.random.default_rng(0)
    ref = {"logits": (rng.standard_normal((16, 5)) * 50).astype(np.float32)}
    ref["logits"][8:] /= 100  # the second half: small logits
    noise = ref["logits"] * (1 + 2e-6 * rng.standard_normal(ref["logits"].shape)).astype(np.float32)
    assert compare(ref, {8: {"logits": noise}})["passed"]
    bounds = logit_bounds(ref["logits"], 8, Tolerance())
    assert bounds[0] > 10 * bounds[8] and len(set(bounds[:8])) == 1  # one scale per batch of 8
    wrong = ref["logits"] * np.float32(1 + 1e-3)
    r = compare(ref, {8: {"logits": wrong}})
    assert r["passed"] is False and r["logit_diff_to_bound"] > 1 and "bound" in r["problems"][0]
    small_off = ref["logits"].copy()
    small_off[9, 0] += 3e-4  # below the big rows' bound, above the small rows' one
    assert compare(ref, {8: {"logits": small_off}})["passed"] is False
    assert compare(ref, {16: {"logits": small_off}})["passed"] is True  # run with the big rows: their scale


def test_preprocess_none_with_ort_offline_optimization(exported, tmp_path):
    import onnx

    model = exported[0]
    report = zoo.export(model, formats="onnx", out=tmp_path / "out", preprocess="none", optimize=True,
                        embedding=False)
    art = report["artifacts"]["onnx"]
    assert art["status"] == "passed" and art["validation"]["min_embedding_cosine"] is None
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    (inp,) = proto.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["zoo.metadata"])
    assert meta["preprocess"] == "none" and meta["input_layout"] == "NCHW"
    assert meta["ort_offline_optimization"] == "basic"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded into the convs
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import)  # still standard ops only


def test_opset_below_18_is_written_and_validated(exported, tmp_path):
    import onnx

    report = zoo.export(exported[0], formats="onnx", out=tmp_path / "out", opset=17)
    art = report["artifacts"]["onnx"]
    assert art["status"] == "passed" and art["validation"]["max_abs_logit_diff"] <= 1e-4
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert "fallbacks" not in report  # asking for an old opset is not a fallback


def _break_dynamo(monkeypatch):
    """A clean install without onnxscript: `import onnxscript` fails, so the dynamo exporter can't run."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)


def test_dynamo_fallback_is_loud_and_recorded(exported, tmp_path, monkeypatch, capfd):
    _break_dynamo(monkeypatch)
    report = zoo.export(exported[0], formats="onnx", out=tmp_path / "out")
    err = capfd.readouterr().err
    assert "dynamo ONNX exporter could not be used: onnxscript is not installed" in err
    assert "--onnx-exporter dynamo" in err
    assert report["status"] == "passed"  # the fallback artifact is still validated like any other
    assert report["artifacts"]["onnx"]["validation"]["max_abs_logit_diff"] <= 1e-4
    on_disk = json.loads((tmp_path / "out" / "export-report.json").read_text())
    assert "onnxscript is not installed" in on_disk["fallbacks"]["onnx"]["reason"]


def test_onnx_exporter_dynamo_turns_the_fallback_into_an_error(exported, tmp_path, monkeypatch):
    from zoo.cli.main import main
    from zoo.errors import ZooError
    from zoo.model import save_model

    _break_dynamo(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ZooError, match="dynamo ONNX exporter could not be used: onnxscript"):
        zoo.export(exported[0], formats="onnx", out=out, onnx_exporter="dynamo")
    assert not (out / "model.onnx").exists()
    run = save_model(exported[0], tmp_path / "run")
    code = main(["export", str(run), "--format", "onnx", "--onnx-exporter", "dynamo", "--out", str(tmp_path / "o2")])
    assert code == 2 and not (tmp_path / "o2" / "model.onnx").exists()


def test_zoo_export_is_the_function_and_no_module_shadows_it(exported):
    """`zoo.export` is the function, on first use and after the exporting package is imported
    (there is no `zoo.export` module to rebind it); the toolkit lives in `zoo.exporting`."""
    import importlib.util

    import zoo.exporting

    assert zoo.export is zoo.exporting.export and callable(zoo.export)
    assert importlib.util.find_spec("zoo.export") is None
    assert callable(zoo.exporting.artifact_metadata)
