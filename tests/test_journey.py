"""The user's journey over real pretrained backbones, with the README's commands and defaults only:
`zoo train --backbone B --data teapots/ --out runs/j` -> `zoo evaluate runs/j --data holdout/` ->
`zoo export runs/j` (every format, validated) -> `zoo predict` with the ONNX, TorchScript and .pt2
files on the same holdout images -> the same top-1 as `zoo evaluate`, and the same top class per
image in every format.

Backbones: the embedded default (timm/tf_efficientnet_lite0, weights shipped in a package) and
torchvision's MobileNetV2 with the ImageNet weights in ../shared (skipped where absent). The data
are small folders of real photos (tests/docdata.py). Every command runs as a user runs it: `zoo` on
PATH, a fresh working directory, no flag the README does not show.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docdata import make_doc_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}


def _zoo(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["zoo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, f"zoo {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(2400)  # five commands, each a fresh process: lite0 took 768 s on 2 cores at a load average of ~20
@pytest.mark.parametrize("backbone", ["timm/tf_efficientnet_lite0", "torchvision/mobilenet_v2.IMAGENET1K_V1"])
def test_train_evaluate_export_predict(backbone, tmp_path):
    torch_home = tmp_path / "torch-home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    if backbone.startswith("torchvision/"):
        src = SHARED / "weights" / MOBILENET_FILE
        if not src.is_file():
            pytest.skip(f"{src} is absent: torchvision's MobileNetV2 ImageNet weights, offline")
        try:
            (torch_home / "hub" / "checkpoints" / MOBILENET_FILE).symlink_to(src)
        except OSError:
            shutil.copy(src, torch_home / "hub" / "checkpoints" / MOBILENET_FILE)
    cwd = tmp_path / "work"
    cwd.mkdir()
    make_doc_data(cwd)
    env = dict(os.environ, ZOO_CACHE_DIR=str(tmp_path / "cache"), TORCH_HOME=str(torch_home), HF_HUB_OFFLINE="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))

    # -- train, evaluate: the README's commands -----------------------------------------------------------
    _zoo(["train", "--backbone", backbone, "--data", "teapots/", "--out", "runs/j"], cwd, env)
    out = _zoo(["evaluate", "runs/j", "--data", "holdout/"], cwd, env).stdout
    m = re.search(r"top-1: ([\d.]+)%.*\((\d+) images", out)
    assert m, out
    evaluated_top1, count = float(m.group(1)), int(m.group(2))
    assert count == 16
    assert evaluated_top1 >= 75.0, f"{backbone}: {evaluated_top1}% on 4 classes of distinct photos\n{out}"

    # -- export every format, validated (exit 0 only if all passed) ---------------------------------------
    _zoo(["export", "runs/j"], cwd, env)
    report = json.loads((cwd / "runs/j/export/export-report.json").read_text())
    for fmt in FORMATS:
        assert report["artifacts"][fmt]["status"] == "passed", report["artifacts"][fmt]

    # -- predict with each file: the same top-1 as evaluate, the same class per image -------------------------
    per_format = {}
    for fmt, name in FORMATS.items():
        res = json.loads(_zoo(["predict", f"runs/j/export/{name}", "holdout/", "--top-k", "3", "--json"],
                              cwd, env).stdout)
        preds = {Path(p["path"]).as_posix().split("holdout/")[-1]: p["top"][0]["label"] for p in res["predictions"]}
        assert len(preds) == count, res
        correct = sum(path.split("/")[0] == label for path, label in preds.items())
        assert 100 * correct / count == pytest.approx(evaluated_top1, abs=0.01), \
            f"{fmt}: {correct}/{count} vs zoo evaluate's {evaluated_top1}%"
        per_format[fmt] = preds
    assert per_format["onnx"] == per_format["torchscript"] == per_format["pt2"]
