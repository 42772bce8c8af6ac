"""Data honesty (issue #18): each problem is one line and exit 2 from the CLI, naming the thing;
a failed save leaves the run resumable, never half-written; cross-validation is the default
choice and its estimate is reported."""

from __future__ import annotations

import json
import shutil

import pytest

from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs
from zoo.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("honesty")
    return make_image_folder(d / "data", per_class=10), random_weights_file(d / "w.safetensors"), d


def _train_args(data, weights, out, cache, *extra):
    return ["train", "--backbone", BACKBONE, "--weights", str(weights), "--image-size", "32", "--epochs", "3",
            "--batch-size", "8", "--out", str(out), "--cache-dir", str(cache), "--workers", "0", "--no-progress",
            "--device", "cpu", *extra] + ([] if "--csv" in extra else ["--data", str(data)])


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "unexpected" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("  ", "warning", "Warning")) and "Warning" not in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_same_content_under_two_labels_is_an_error_naming_both_files(setup, tmp_path, capsys):
    data, weights, d = setup
    dup = tmp_path / "dup"
    shutil.copytree(data, dup)
    shutil.copy(dup / "red" / "red_000.png", dup / "green" / "copy_of_red.png")
    line = _one_line_exit_2(capsys, _train_args(dup, weights, tmp_path / "run", d / "cache"))
    assert "red_000.png" in line and "copy_of_red.png" in line and "--allow-duplicates" in line
    assert not (tmp_path / "run").exists()
    # --allow-duplicates keeps them, with a warning
    with pytest.warns(UserWarning, match="identical content under two labels"):
        assert main(_train_args(dup, weights, tmp_path / "run2", d / "cache", "--allow-duplicates")) == 0
    # the same content under ONE label is not a conflict
    same = tmp_path / "same"
    shutil.copytree(data, same)
    shutil.copy(same / "red" / "red_000.png", same / "red" / "again.png")
    assert main(_train_args(same, weights, tmp_path / "run3", d / "cache")) == 0


def test_a_class_whose_files_are_all_missing_is_an_error_naming_it(setup, tmp_path, capsys):
    data, weights, d = setup
    csv = tmp_path / "list.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted(data.glob("*/*.png"))] + ["gone/a.png,ghost", "gone/b.png,ghost"]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    line = _one_line_exit_2(capsys, _train_args(data, weights, tmp_path / "run", d / "cache", "--csv", str(csv),
                                                "--csv-outside-root"))
    assert "'ghost'" in line and "no usable images" in line


def test_an_unrecognized_csv_header_is_an_error(setup, tmp_path, capsys):
    data, weights, d = setup
    csv = tmp_path / "list.csv"
    csv.write_text("file,cls\n" + "\n".join(f"{p},{p.parent.name}" for p in sorted(data.glob("*/*.png"))) + "\n")
    line = _one_line_exit_2(capsys, _train_args(data, weights, tmp_path / "run", d / "cache", "--csv", str(csv),
                                                "--csv-outside-root"))
    assert "unrecognized header 'file,cls'" in line and "list.csv:1" in line
    ok = tmp_path / "ok.csv"  # a recognized header, and none at all, both work
    ok.write_text("image,class\n" + "\n".join(f"{p},{p.parent.name}" for p in sorted(data.glob("*/*.png"))) + "\n")
    from zoo.data import read_csv

    assert len(read_csv(ok, allow_outside_root=True)[0]) == 30


def test_a_non_utf8_csv_names_the_file_and_line(setup, tmp_path, capsys):
    data, weights, d = setup
    csv = tmp_path / "latin1.csv"
    lines = [f"{p},{p.parent.name}" for p in sorted(data.glob("*/*.png"))]
    lines[4] = lines[4].replace(".png", "\xe9.png")
    csv.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    line = _one_line_exit_2(capsys, _train_args(data, weights, tmp_path / "run", d / "cache", "--csv", str(csv),
                                                "--csv-outside-root"))
    assert "latin1.csv:5" in line and "not UTF-8" in line


def test_a_failing_disk_while_saving_names_the_path_and_leaves_the_run_resumable(setup, tmp_path, capsys,
                                                                                  monkeypatch):
    """Fault injected on write: safetensors fails writing the head (as a full disk does). The
    error names the file; nothing of the finished run is left (no model.json, no metrics), the
    checkpoint is, and --resume then finishes the run."""
    import safetensors.torch

    data, weights, d = setup
    out = tmp_path / "run"
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if ".head.safetensors" not in str(filename):  # the feature cache writes fine
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)  # half-written, then the disk is full
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    line = _one_line_exit_2(capsys, _train_args(data, weights, out, d / "cache"))
    assert "No space left on device" in line and ".head.safetensors" in line and "--resume" in line
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoint.pt", "config.json"], left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--workers", "0", "--device", "cpu"]) == 0
    assert (out / "model.json").is_file() and json.loads((out / "metrics.json").read_text())["final"]["top1"] is not None


def test_cross_validation_is_the_default_choice_and_is_reported(setup, tmp_path, capsys):
    import zoo

    data, weights, d = setup
    run = zoo.train(BACKBONE, data, weights=str(weights), out=tmp_path / "run",
                    **train_kwargs(d, epochs=4, val_split=0.3))
    sel = run.model.meta.extra["training"]["selection"]
    assert sel["on"] == "cross-validation" and sel["refit"] is None
    cv = sel["cv"]
    assert cv["folds"] == 5 and cv["images"] == len(run.model.labels) * 7  # 10/class, 3 to validation
    assert run.best_epoch == cv["epoch"] and sel["weight_decay"] == cv["weight_decay"]
    assert 0 <= cv["cv_top1_ci95"][0] <= cv["cv_top1"] <= cv["cv_top1_ci95"][1] <= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert metrics["selection"]["cv"]["epoch"] == cv["epoch"]
    lo, hi = metrics["top1_ci95"]
    assert lo <= metrics["top1"] <= hi and len(metrics["per_class_recall"]) == 3
    text = run.summary()
    assert "95% interval" in text and "5-fold cross-validation" in text and "per-class recall" in text
    model_json = json.loads((tmp_path / "run" / "model.json").read_text())
    assert model_json["extra"]["training"]["val_top1_ci95"] == [lo, hi]
    # zoo evaluate: the same interval and the run's CV estimate
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(data), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "95% interval" in out and "5-fold top-1" in out
