"""int8 worth shipping: static int8 (QDQ, calibrated on the run's own images) is the default
quantization, its outputs do not depend on the batch, the report says what it is worth against
fp32 (accuracy on the run's validation data, agreement, logit differences, size, speed), the
validation images are the run's own, and the metadata names the runtimes verified to run it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import zoo
from trainhelpers import make_image_folder, train_kwargs
from zoo.model import load_model
from zoo.validation import RUN_VALIDATION_IMAGES, Tolerance, compare

BACKBONE = "timm/mobilenetv3_small_050"  # random init: depthwise convs and hard-swish, like the real targets
SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run trained by `zoo.train` (3 classes, 16 images each, a quarter held out for validation),
    exported with `quantize="int8"` as users do."""
    root = tmp_path_factory.mktemp("int8")
    data = make_image_folder(root / "data", per_class=16, size=48)
    zoo.train(BACKBONE, data, out=root / "run", **train_kwargs(root, weights=None, image_size=SIZE))
    report = zoo.export(root / "run", formats="onnx", quantize="int8")
    return root / "run", root / "run" / "export", report


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch(seed: int = 0) -> np.ndarray:
    """Eight uint8 images; the first is low-contrast (values 110..145), one is full-range black
    and white: what a per-batch activation range would be stretched by."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    x[0] = rng.integers(110, 146, (SIZE, SIZE, 3), dtype=np.uint8)
    x[1] = np.where(rng.random((SIZE, SIZE, 1)) < 0.5, 0, 255).astype(np.uint8)
    return x


def _alone_vs_in_batch(path) -> float:
    sess = _session(path)
    x = _batch()
    batched = sess.run(["logits"], {"image": x})[0]
    alone = np.concatenate([sess.run(["logits"], {"image": x[i:i + 1]})[0] for i in range(len(x))])
    return float(np.abs(batched - alone).max())


def test_static_int8_is_the_default_and_independent_of_the_batch(exported):
    _, out, report = exported
    art = report["artifacts"]["onnx-int8"]
    assert art["status"] == "passed" and art["path"] == str(out / "model.int8.onnx")
    meta = json.loads((out / "model.int8.onnx.json").read_text())
    assert meta["int8_mode"] == "static" and meta["calibration_method"] == "minmax"
    # the same image alone and inside a batch of 8 gives the same output
    assert _alone_vs_in_batch(out / "model.int8.onnx") <= 1e-5
    assert art["validation"]["max_batch_size_diff"] <= 1e-5  # and so did validation at batch 1, 3 and 8
    assert not (out / "model.int8-dynamic.onnx").exists()  # dynamic is never written unless asked for


def test_dynamic_int8_is_opt_in_and_depends_on_the_batch(exported, tmp_path):
    from zoo_onnx import export_onnx_int8_dynamic

    from zoo.export import resolve_formats

    run, out, _ = exported
    assert resolve_formats("onnx", "int8") == ["onnx", "onnx-int8"]
    assert resolve_formats("onnx", "int8-dynamic") == ["onnx", "onnx-int8-dynamic"]
    path = tmp_path / "model.int8-dynamic.onnx"
    rep = export_onnx_int8_dynamic(load_model(run), path, artifacts={"onnx": str(out / "model.onnx")})
    assert rep["metadata"]["int8_mode"] == "dynamic" and rep["metadata"]["runtimes"] == ["onnxruntime"]
    # the negative control: per-batch activation ranges change the low-contrast image's answer
    dynamic_diff = _alone_vs_in_batch(path)
    assert dynamic_diff > 100 * max(_alone_vs_in_batch(out / "model.int8.onnx"), 1e-6)


def test_report_says_what_int8_is_worth_on_the_runs_own_data(exported, capsys):
    run, out, report = exported
    val_split = json.loads((run / "validation.json").read_text())["items"]
    images = report["images"]
    assert images["source"].startswith("the run's validation split")
    assert images["count"] == min(len(val_split), RUN_VALIDATION_IMAGES) == images["labelled"]
    assert report["calibration"]["source"].startswith("the run's training images")
    assert report["calibration"]["count"] > 0

    v = report["artifacts"]["onnx-int8"]["validation"]
    value = v["int8"]
    for key in ("accuracy_fp32", "accuracy_int8", "accuracy_drop", "top1_agreement", "max_abs_logit_diff",
                "mean_abs_logit_diff", "size_ratio", "speedup", "fp32_ms", "int8_ms"):
        assert isinstance(value[key], float) and np.isfinite(value[key]), key
    assert value["accuracy_images"] == images["count"]
    assert value["accuracy_fp32"] == v["accuracy"]["eager"] and value["accuracy_int8"] == v["accuracy"]["artifact"]
    sizes = (out / "model.int8.onnx").stat().st_size / (out / "model.onnx").stat().st_size
    assert value["size_ratio"] == pytest.approx(sizes) and value["size_ratio"] < 0.5  # the convs are int8
    assert value["smaller"] is True and value["faster"] == (value["speedup"] > 1)
    assert json.loads((out / "export-report.json").read_text())["artifacts"]["onnx-int8"]["validation"]["int8"] == value

    from zoo.cli.cmd_export import _print_table

    _print_table(report)
    printed = capsys.readouterr().out
    assert "static int8: top-1" in printed and f"size {value['size_ratio']:.2f}x fp32" in printed


def test_an_int8_file_that_is_not_faster_or_not_smaller_is_reported(exported, monkeypatch):
    import zoo_onnx

    run, out, report = exported
    model = load_model(run)
    monkeypatch.setattr(zoo_onnx, "time_sessions", lambda paths, x, threads: {"fp32": 0.010, "int8": 0.020, "runs": 3})
    value = zoo_onnx.int8_value(model, out / "model.int8.onnx", _batch(), report["artifacts"]["onnx-int8"]["validation"],
                                artifacts={"onnx": str(out / "model.onnx")})
    assert value["faster"] is False and value["speedup"] == pytest.approx(0.5)
    assert any("NOT faster" in n for n in value["notes"])
    value = zoo_onnx.int8_value(model, out / "model.onnx", _batch(), {}, artifacts={"onnx": str(out / "model.onnx")})
    assert value["smaller"] is False and any("NOT smaller" in n for n in value["notes"])


def test_int8_fails_closed_on_an_accuracy_drop():
    ref = {"logits": np.eye(3, dtype=np.float32)[[0, 1, 2] * 20]}
    worse = ref["logits"].copy()
    worse[:3] = np.roll(worse[:3], 1, axis=1)  # 3 of 60 answers change: 100% -> 95%, agreement 0.95
    targets = list(ref["logits"].argmax(1))
    failed = compare(ref, {1: {"logits": worse}}, Tolerance(), kind="int8", targets=targets)
    assert failed["passed"] is False and failed["accuracy"]["delta"] == pytest.approx(-0.05)
    assert any("accuracy" in p and "100.0%" in p and "95.0%" in p for p in failed["problems"])
    assert compare(ref, {1: {"logits": worse}}, Tolerance(int8_accuracy_drop=0.06), kind="int8",
                   targets=targets)["passed"] is True


def test_metadata_names_the_runtimes_verified_to_run_it(exported, tmp_path):
    from zoo_onnx import export_onnx_int8
    from zoo_onnx.targets import runner

    from zoo.errors import ZooError

    run, out, _ = exported
    fp32 = json.loads((out / "model.onnx.json").read_text())
    int8 = json.loads((out / "model.int8.onnx.json").read_text())
    assert {"onnxruntime", "openvino"} <= set(fp32["runtimes"])  # fp32 lists every target whose profile it fits
    assert int8["runtimes"] == ["onnxruntime", "openvino"]
    # OpenVINO runs the QDQ file and agrees with ONNX Runtime on it
    pytest.importorskip("openvino", reason="the openvino extra is in the test extra")
    x = _batch()
    by_ov = runner("openvino", out / "model.int8.onnx")[0](x)["logits"]
    by_ort = runner("onnxruntime", out / "model.int8.onnx")[0](x)["logits"]
    assert np.abs(by_ov - by_ort).max() <= 0.05 * max(1.0, float(np.abs(by_ort).max()))
    assert (by_ov.argmax(1) == by_ort.argmax(1)).mean() >= 0.875
    # the opencv target is refused for int8, with the way out, before any work
    with pytest.raises(ZooError, match="opencv target does not run int8.*--target onnxruntime or openvino"):
        export_onnx_int8(load_model(run), tmp_path / "x.int8.onnx", target="opencv")
    assert not (tmp_path / "x.int8.onnx").exists()


def test_validation_images_fall_back_and_say_why(exported, tmp_path):
    """A run whose validation.json is gone validates on the default images, and says so; --images
    still overrides the run's own split."""
    import shutil

    from zoo.export import validation_images

    run, _, _ = exported
    model = load_model(run)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    (copy / "validation.json").unlink()
    said = []
    vimages = validation_images(None, model, copy, said.append)
    assert vimages.source.startswith("scikit-image sample photos")
    assert "the run's validation split is not usable" in vimages.source and said
    given = make_image_folder(tmp_path / "given", per_class=1, size=40)
    assert validation_images(str(given), model, run).source == "3 files"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
