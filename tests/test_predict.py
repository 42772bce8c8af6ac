"""The predictor: ONNX file alone -> predictions, with onnxruntime, numpy and Pillow only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zoo
from test_export_support import LABELS, eager_probabilities, tiny_model, write_images
from zoo.errors import ZooError

# Runs before anything else in the child: importing torch (or anything pulling it in) fails.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ModuleNotFoundError(f"torch is blocked in this test: {name}", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A small model exported twice: baked preprocessing (default) and float input. The legacy
    exporter (opset 17) keeps this quick; the dynamo path is covered by the round trips."""
    root = tmp_path_factory.mktemp("predict")
    model = tiny_model("torchvision/resnet18", size=40)
    for mode in ("normalize", "none"):
        zoo.export(model, formats="onnx", out=root / mode, preprocess=mode, opset=17)
    images = write_images(root / "images", per_class=3)
    return model, root, images


@pytest.mark.parametrize("mode", ["normalize", "none"])
def test_predictor_matches_eager_pytorch(artifacts, mode):
    from zoo.predict import Predictor

    model, root, images = artifacts
    predictor = Predictor(root / mode / "model.onnx")
    assert predictor.preprocess_mode == mode and predictor.labels == list(LABELS)
    probs = predictor.probabilities(images)
    np.testing.assert_allclose(probs, eager_probabilities(model, images), atol=1e-5)
    top = predictor.predict(images, top_k=10)  # k is capped at the number of classes
    assert all(len(t) == 3 for t in top)
    assert [t[0].index for t in top] == list(eager_probabilities(model, images).argmax(1))


def test_predictor_accepts_pil_images(artifacts):
    from PIL import Image

    from zoo.predict import Predictor

    model, root, images = artifacts
    predictor = Predictor(root / "normalize" / "model.onnx")
    pil = [Image.open(p) for p in images[:2]]
    np.testing.assert_allclose(predictor.probabilities(pil), predictor.probabilities(images[:2]), atol=1e-6)


def test_predictor_never_imports_torch(artifacts, tmp_path):
    """A child process where importing torch raises: the predictor still works, and afterwards
    no torch module is loaded."""
    _, root, images = artifacts
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        from zoo.predict import Predictor
        res = Predictor({str(root / "normalize" / "model.onnx")!r}).predict_files([{str(images[0].parent.parent)!r}], top_k=2)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
        print(json.dumps({{"n": len(res), "torch_modules": bad}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"n": len(images), "torch_modules": []}


def test_zoo_predict_cli_never_imports_torch(artifacts):
    """The same through `zoo predict` (the CLI builds every command's parser: none may pull torch in)."""
    _, root, images = artifacts
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from zoo.cli.main import main
        rc = main(["predict", {str(root / "none" / "model.onnx")!r}, {str(images[0])!r}, "--json"])
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
        assert not bad, bad
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["predictions"][0]["path"] == str(images[0])


def test_predictor_refuses_an_onnx_file_without_zoo_metadata(artifacts, tmp_path):
    import onnx

    from zoo.predict import Predictor

    _, root, _ = artifacts
    proto = onnx.load(str(root / "normalize" / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ZooError, match="no zoo metadata"):
        Predictor(tmp_path / "bare.onnx")


def test_predictor_reports_unreadable_inputs(artifacts, tmp_path):
    from zoo.errors import DataError
    from zoo.predict import Predictor

    _, root, _ = artifacts
    predictor = Predictor(root / "normalize" / "model.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        predictor.predict_files([tmp_path / "empty"])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    [row] = predictor.predict_files([tmp_path / "broken.jpg"])  # a per-file error, not an abort
    assert "not a readable image" in row["error"] and "top" not in row


def _with_metadata(src, dst, **changes):
    """A copy of an exported ONNX file whose zoo metadata has `changes` ("normalization.x" keys
    reach into the normalization)."""
    import onnx
    from zoo_onnx import read_metadata, set_metadata

    meta = read_metadata(src)
    for key, value in changes.items():
        if key.startswith("normalization."):
            meta["normalization"][key.split(".", 1)[1]] = value
        else:
            meta[key] = value
    proto = onnx.load(str(src))
    set_metadata(proto, meta)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("change, key", [
    ({"normalization.resize_size": -5}, "normalization.resize_size"),
    ({"normalization.resize_size": 0}, "normalization.resize_size"),
    ({"normalization.resize_size": 10 ** 9}, "normalization.resize_size"),
    ({"normalization.resize_size": "48"}, "normalization.resize_size"),
    ({"normalization.interpolation": "cubic-ish"}, "normalization.interpolation"),
    ({"normalization.crop_mode": "random"}, "normalization.crop_mode"),
    ({"normalization.input_size": [3, 41, 40]}, "normalization.input_size"),
    ({"normalization.input_size": "3x40x40"}, "normalization.input_size"),
    ({"normalization.std": [0.2, 0.0, 0.2]}, "normalization.std"),
    ({"normalization.mean": [0.5, "x", 0.5]}, "normalization.mean"),
    ({"preprocess": "magic"}, "preprocess"),
    ({"labels": ["a", 2, "c"]}, "labels"),
])
def test_damaged_metadata_is_one_clear_error(artifacts, tmp_path, change, key):
    _, root, images = artifacts
    bad = _with_metadata(root / "normalize" / "model.onnx", tmp_path / "bad.onnx", **change)
    proc = subprocess.run([sys.executable, "-c", "from zoo.cli.main import main; raise SystemExit(main())",
                           "predict", str(bad), str(images[0])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"metadata is damaged: {key} " in proc.stderr and "zoo export" in proc.stderr
    assert "unexpected" not in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_labels_are_printed_escaped(artifacts, tmp_path):
    _, root, images = artifacts
    hostile = ["\x1b[2J\x1b]0;pwned\x07cat", "dog", "bird"]
    bad = _with_metadata(root / "normalize" / "model.onnx", tmp_path / "esc.onnx", labels=hostile)
    proc = subprocess.run([sys.executable, "-c", "from zoo.cli.main import main; raise SystemExit(main())",
                           "predict", str(bad), *map(str, images[:3]), "--top-k", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b[2J" in proc.stdout and "dog" in proc.stdout
