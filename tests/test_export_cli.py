"""`zoo export RUN ...` and `zoo predict MODEL.onnx ...` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from test_export_support import LABELS, eager_probabilities, tiny_model, write_images
from zoo.cli.main import main
from zoo.model import load_model, save_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_model(tiny_model("torchvision/resnet18", size=48), root / "run")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-images")
    write_images(root)
    return root


def test_help_lists_export_and_predict(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "export" in text and "predict" in text


def test_export_then_predict(run_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export", str(run_dir), "--format", "onnx", "--opset", "17", "--images", str(image_dir),
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    v = report["artifacts"]["onnx"]["validation"]
    assert report["status"] == "passed" and v["passed"]
    assert report["images"]["count"] == 6 and report["images"]["labelled"] == 6
    assert v["accuracy"]["images"] == 6 and v["accuracy"]["delta"] == 0.0  # labelled images: accuracy delta
    assert (out / "model.onnx").is_file()

    rc = main(["predict", str(out / "model.onnx"), str(image_dir), "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    preds = json.loads(captured.out)["predictions"]
    paths = sorted(image_dir.rglob("*.*"))
    assert [p["path"] for p in preds] == [str(p) for p in paths]
    probs = eager_probabilities(load_model(run_dir), paths)
    for pred, p in zip(preds, probs):
        assert len(pred["top"]) == 2
        assert pred["top"][0]["label"] == LABELS[int(p.argmax())]
        assert pred["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)

    rc = main(["predict", str(out / "model.onnx"), str(paths[0]), "-k", "1"])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.startswith(f"{paths[0]}: {LABELS[int(probs[0].argmax())]} (")


def test_export_over_tolerance_exits_3_and_leaves_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export", str(run_dir), "--format", "onnx", "--opset", "17", "--tolerance", "1e-12", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 3
    assert "failed validation" in captured.err
    assert "failed" in captured.out  # the table with the numbers still prints
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "export-report.json").read_text())["status"] == "failed"


def test_export_unknown_format_is_a_clear_error(run_dir, tmp_path, capsys):
    rc = main(["export", str(run_dir), "--format", "onxx", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown export format 'onxx'" in err and "did you mean onnx" in err


def test_export_not_a_run_directory(tmp_path, capsys):
    rc = main(["export", str(tmp_path), "--format", "onnx"])
    assert rc == 2 and "no model.json" in capsys.readouterr().err


def test_predict_errors(tmp_path, capsys):
    rc = main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
