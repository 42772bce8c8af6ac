"""`zoo train` and `zoo evaluate` through the real CLI entry point; errors print without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from trainhelpers import BACKBONE, make_image_folder, random_weights_file
from zoo.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return make_image_folder(d / "data", per_class=10), random_weights_file(d / "w.safetensors"), d


def _args(data, weights, out, cache, *extra):
    return ["train", "--backbone", BACKBONE, "--weights", str(weights), "--data", str(data), "--image-size", "32",
            "--epochs", "12", "--lr", "3e-3", "--batch-size", "8", "--out", str(out), "--cache-dir", str(cache),
            "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def test_train_then_evaluate(setup, capsys):
    data, weights, d = setup
    out = d / "run1"
    assert main(_args(data, weights, out, d / "cache", "--head", "mlp", "--hidden", "32", "--json")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["run"] == str(out) and result["val_top1"] > 0.8 and result["epochs"] == 12
    assert (out / "model.json").is_file() and (out / "confusion.png").is_file()
    assert main(["evaluate", str(out), "--data", str(data), "--json", "--device", "cpu", "--workers", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["count"] == 30 and ev["top1"] > 0.8 and ev["labels"] == ["blue", "green", "red"]
    assert main(["evaluate", str(out), "--data", str(data), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("top-1: ") and "confusion" in text


def test_existing_run_dir_is_refused_and_resume_finishes(setup, capsys):
    data, weights, d = setup
    out = d / "run2"
    assert main(_args(data, weights, out, d / "cache", "--epochs", "2")) == 0
    assert "validation top-1:" in capsys.readouterr().out
    mtime = (out / "head.safetensors").stat().st_mtime_ns
    assert main(_args(data, weights, out, d / "cache")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "Traceback" not in err
    assert (out / "head.safetensors").stat().st_mtime_ns == mtime  # untouched
    # --resume continues the saved run; --epochs may extend it
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"] == 3


def test_data_errors_are_clear_and_early(setup, tmp_path, capsys):
    _, weights, d = setup
    bad = make_image_folder(tmp_path / "bad", per_class=2, classes=("cat", "dog"))
    (bad / "bird").mkdir()
    out = tmp_path / "never"
    assert main(_args(bad, weights, out, d / "cache")) == 2
    err = capsys.readouterr().err
    assert "'bird'" in err and "hold no images" in err and "Traceback" not in err
    assert not out.exists()
    (bad / "bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(_args(bad, weights, out, d / "cache", "--strict")) == 2
    assert "broken.jpg" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--resume", "--no-progress"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_csv_input(setup, tmp_path, capsys):
    data, weights, d = setup
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted(data.glob("*/*.png"))))
    out = tmp_path / "run"
    args = _args(data, weights, out, d / "cache", "--json")
    i = args.index("--data")
    args[i:i + 2] = ["--csv", str(csv_file)]
    assert main(args) == 2  # absolute paths outside the CSV's folder need the flag
    assert "--csv-outside-root" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--csv-outside-root"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_top1"] > 0.8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embedded_default_demo_is_offline_and_accurate(tmp_path):
    """The README's main job: `zoo train` with no --data, on a fresh cache, offline, with real
    pretrained weights (accuracy far above the 10% chance). Its wall time is printed, not asserted:
    timing targets live in benchmarks/, and a loaded CI machine must not fail a correct run."""
    env = dict(os.environ, ZOO_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zoo.cli.main", "train", "--out", str(tmp_path / "run"), "--json",
                           "--no-progress"], capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"embedded demo: {wall:.1f}s wall, val top-1 {100 * result['val_top1']:.1f}%")
    assert result["val_top1"] >= 0.7
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["backbone"] == "timm/tf_efficientnet_lite0" and meta["weights"] == "in1k"
    assert len(meta["labels"]) == 10
