"""Never silently wrong (issue 10): bad options, damaged run directories, dishonest resumes, NaN,
hostile data, and every CLI error as one line with exit 2. One test (at least) per item."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import numpy as np
import pytest
from PIL import Image

from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs
from zoo.cli.main import main
from zoo.errors import DataError, ZooError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("nw")
    return make_image_folder(d / "data", per_class=6, size=24), random_weights_file(d / "w.safetensors"), d


@pytest.fixture(scope="module")
def trained(base):
    """One finished run (random-init backbone from a file: backbone.safetensors is part of it)."""
    import zoo.training as T

    data, weights, d = base
    out = d / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = T.train(BACKBONE, data, out=out, weights=str(weights), **train_kwargs(d, epochs=2, val_split=0.34))
    return run, out


def _copy_run(trained, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained[1], dst)
    return dst


# --------------------------------------------------------------------------- 1. options
@pytest.mark.parametrize("field,value,flag", [
    ("lr", float("inf"), "--lr"), ("lr", float("nan"), "--lr"), ("weight_decay", float("nan"), "--weight-decay"),
    ("dropout", 1.5, "--dropout"), ("label_smoothing", 5.0, "--label-smoothing"), ("image_size", 0, "--image-size"),
    ("image_size", 1, "--image-size"), ("hidden", (0,), "--hidden"), ("val_split", -0.5, "--val-split"),
    ("val_split", float("nan"), "--val-split"), ("epochs", 0, "--epochs"), ("freeze", -1, "--freeze"),
    ("device", "gpu", "--device"), ("num_workers", -1, "--workers"),
])
def test_train_options_are_checked_on_construction(field, value, flag):
    from zoo.options import OptionError, TrainConfig

    with pytest.raises(OptionError) as err:
        TrainConfig(**{field: value})
    assert str(err.value).startswith(flag + " must be")


def test_other_configs_checked_and_cli_defaults_come_from_them():
    from dataclasses import MISSING, fields

    from zoo.cli.main import build_parser
    from zoo.options import EvaluateConfig, ExportConfig, OptionError, PredictConfig, TrainConfig, defaults

    for bad in (dict(preprocess="rgb"), dict(tolerance=float("nan")), dict(int8_agreement=1.5)):
        with pytest.raises(OptionError):
            ExportConfig(**bad)
    for bad in (0, -3):
        with pytest.raises(OptionError, match="--top-k"):
            PredictConfig(model="m.onnx", inputs=("x",), top_k=bad)
    with pytest.raises(OptionError, match="--batch-size"):
        EvaluateConfig(run="r", batch_size=0)
    # the parsers: every option a config has is offered, with the config's default (train passes
    # only what was given, so its defaults are TrainConfig's by construction)
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    train_args = subs["train"].parse_args([])
    assert {k for k in vars(train_args) if not k.startswith("_")} <= {"out", "resume", "json"}
    train_dests = {a.dest for a in subs["train"]._actions}
    assert {f.name for f in fields(TrainConfig)} <= train_dests
    for cmd, cls, argv in (("evaluate", EvaluateConfig, ["RUN"]), ("export", ExportConfig, ["RUN"]),
                           ("predict", PredictConfig, ["m.onnx", "x.jpg"])):
        ns = vars(subs[cmd].parse_args(argv))
        for name, default in defaults(cls).items():
            if name in ns and name not in ("formats", "out", "inputs"):
                assert ns[name] == default, (cmd, name)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        assert all(r in ns for r in required), (cmd, required)


# --------------------------------------------------------------------------- 2. run directory verified
def test_missing_or_altered_weights_are_refused_never_substituted(trained, tmp_path, capsys):
    from zoo.model import load_model

    run, _ = trained
    meta = json.loads((run.dir / "model.json").read_text())
    assert meta["format_version"] == 2 and set(meta["files"]) == {"head.safetensors", "backbone.safetensors"}
    assert meta["files"]["head.safetensors"]["tensors"]["0.weight"] == [3, 512]
    load_model(run.dir)  # intact: loads

    missing = _copy_run(trained, tmp_path / "a")
    (missing / "backbone.safetensors").unlink()
    with pytest.raises(ZooError, match="backbone.safetensors' is missing"):
        load_model(missing)
    for cmd in (["evaluate", str(missing)], ["export", str(missing), "--out", str(tmp_path / "x")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "backbone.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    altered = _copy_run(trained, tmp_path / "b")
    raw = bytearray((altered / "head.safetensors").read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"  # a valid file with one float rewritten
    (altered / "head.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ZooError, match="head.safetensors' was altered"):
        load_model(altered)

    garbage = _copy_run(trained, tmp_path / "c")
    meta_g = json.loads((garbage / "model.json").read_text())
    (garbage / "head.safetensors").write_bytes(b"garbage")
    meta_g["files"]["head.safetensors"].pop("sha256")
    (garbage / "model.json").write_text(json.dumps(meta_g))
    with pytest.raises(ZooError, match="not a readable safetensors file"):
        load_model(garbage)

    relabelled = _copy_run(trained, tmp_path / "d")
    meta_r = json.loads((relabelled / "model.json").read_text())
    meta_r["labels"] = meta_r["labels"] + ["extra"]
    (relabelled / "model.json").write_text(json.dumps(meta_r))
    with pytest.raises(ZooError, match="does not fit the linear head for 4 labels"):
        load_model(relabelled)

    (relabelled / "model.json").write_text("{not json")
    with pytest.raises(ZooError, match="model.json' is damaged: not valid JSON"):
        load_model(relabelled)
    (relabelled / "model.json").write_text(json.dumps({"format_version": 2, "backbone": 3}))
    with pytest.raises(ZooError, match="'backbone' is missing or not a string"):
        load_model(relabelled)


def test_format_1_run_without_its_backbone_file_is_refused(trained, tmp_path):
    from zoo.model import load_model

    old = _copy_run(trained, tmp_path)
    meta = json.loads((old / "model.json").read_text())
    meta.pop("files")
    meta["format_version"] = 1
    (old / "model.json").write_text(json.dumps(meta))
    assert load_model(old).labels == ("blue", "green", "red")
    (old / "backbone.safetensors").unlink()
    with pytest.raises(ZooError, match="backbone.safetensors' is missing"):
        load_model(old)


# --------------------------------------------------------------------------- 3. honest resume
def test_resume_refuses_changed_options_saves_allowed_ones_and_explains_damage(base, tmp_path):
    import zoo.training as T
    from zoo.options import OptionError

    data, weights, d = base
    out = tmp_path / "run"

    def stop(epoch, rec):
        raise KeyboardInterrupt

    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        T.train(BACKBONE, data, out=out, weights=str(weights), on_epoch_end=stop, **train_kwargs(d, epochs=3))
    with pytest.raises(OptionError) as err:
        T.train("torchvision/resnet34", tmp_path / "elsewhere", out=out, resume=True, lr=0.5)
    msg = str(err.value)
    assert "--backbone" in msg and "--data" in msg and "--lr 0.5 (saved: 0.003)" in msg
    with pytest.raises(OptionError, match="--lr"):  # the CLI path: only given options are compared
        main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--debug"])
    ck = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(ck[: len(ck) // 2])
    with pytest.raises(ZooError, match="damaged or not a zoo checkpoint.*train again without --resume"):
        T.train(out=out, resume=True, epochs=4)
    (out / "checkpoint.pt").write_bytes(ck)
    run = T.train(out=out, resume=True, epochs=4, progress=False)
    assert len(run.history) == 4
    assert json.loads((out / "config.json").read_text())["epochs"] == 4  # the change is saved


# --------------------------------------------------------------------------- 4. non-finite guard
def test_divergence_stops_with_a_clear_error_and_saves_no_model(base, tmp_path):
    import zoo.training as T
    from zoo.training.fit import Fitter

    data, weights, d = base
    out = tmp_path / "run"
    calls = []
    bomb = []

    def explode_after_first(epoch, rec):  # the second epoch diverges: the first's checkpoint stays
        calls.append(epoch)
        bomb.append(True)

    import torch

    original = Fitter._epoch

    def epoch_with_nan(self, module, *args, **kwargs):
        if bomb:
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))
        return original(self, module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Fitter, "_epoch", epoch_with_nan)
        with pytest.raises(T.NonFiniteError, match="diverged in epoch 2.*last good checkpoint \\(epoch 1\\)"):
            T.train(BACKBONE, data, out=out, weights=str(weights), on_epoch_end=explode_after_first,
                    **train_kwargs(d, epochs=3))
    assert calls == [1] and not (out / "model.json").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(t).all() for t in ck["trainable"].values())
    # a learning rate that overflows: the same clear error, and no model saved
    with pytest.raises(T.NonFiniteError):
        T.train(BACKBONE, data, out=tmp_path / "run2", weights=str(weights),
                **train_kwargs(d, epochs=2, lr=1e36, weight_decay=0.0))
    assert not (tmp_path / "run2" / "model.json").exists()


# --------------------------------------------------------------------------- 5. data
def test_hostile_data_folder(tmp_path):
    from zoo.data import load_data

    root = make_image_folder(tmp_path / "data", per_class=6, size=24)
    os.mkfifo(root / "red" / "pipe.jpg")  # would block forever if opened
    Image.new("RGB", (300, 300), (1, 2, 3)).save(root / "green" / "big.png")
    shutil.copy(root / "blue" / "blue_000.png", root / "blue" / "copy\nof_blue_000.png")
    with pytest.warns(UserWarning) as record:
        split = load_data(root, val_split=0.5, seed=3, max_pixels=50_000)
    text = "\n".join(str(w.message) for w in record)
    reasons = {os.path.basename(f): r for f, r in split.skipped}
    assert "FIFO" in reasons["pipe.jpg"] and "over the limit of 50000" in reasons["big.png"]
    train_hashes = {split.train.content_hash(i) for i in range(len(split.train))}
    assert not any(split.val.content_hash(i) in train_hashes for i in range(len(split.val)))
    assert "copy\\nof_blue_000.png" in text or "blue_000.png" in text  # escaped: one line per file
    assert all("\n" not in line[2:] for line in text.splitlines() if line.startswith("  "))


def test_csv_duplicates_two_labels_and_paths_outside_root(tmp_path):
    from zoo.data import read_csv

    root = make_image_folder(tmp_path / "data", per_class=2, size=16)
    rows = [f"{c}/{c}_000.png,{c}" for c in ("red", "green", "blue")]
    (tmp_path / "data" / "dup.csv").write_text("\n".join(rows + rows) + "\n")
    samples, _ = read_csv(tmp_path / "data" / "dup.csv")
    assert len(samples) == 3  # a repeated row counts once
    (root / "two.csv").write_text("\n".join(rows + ["red/red_000.png,blue"]) + "\n")
    with pytest.raises(DataError, match="two labels: red/red_000.png"):
        read_csv(root / "two.csv")
    (root / "out.csv").write_text("\n".join(rows + ["../elsewhere.png,red"]) + "\n")
    with pytest.raises(DataError, match="outside.*--csv-outside-root"):
        read_csv(root / "out.csv")
    samples, skipped = read_csv(root / "out.csv", allow_outside_root=True)
    assert len(samples) == 3 and skipped[0][1] == "file not found"


# --------------------------------------------------------------------------- 6. evaluate
def test_evaluate_uses_the_recorded_split_accepts_subsets_lists_foreign_classes(trained, base, tmp_path, capsys):
    from zoo.training import evaluate

    run, out = trained
    data = base[0]
    m = evaluate(out, device="cpu", num_workers=0)
    assert m["count"] == run.final["count"] and m["top1"] == pytest.approx(run.final["top1"])
    sub = tmp_path / "sub"
    shutil.copytree(data / "red", sub / "red")
    m = evaluate(out, sub, device="cpu", num_workers=0)
    assert m["count"] == 6 and m["per_class"][0] is None and m["per_class"][2] is not None
    shutil.copytree(data / "blue", sub / "cats")
    with pytest.raises(DataError, match=r"\['cats'\]"):
        evaluate(out, sub, device="cpu", num_workers=0)
    with pytest.raises(ZooError, match="needs data= or csv="):
        evaluate(run.model)
    (out / "validation.json").rename(out / "v.json")
    try:
        assert main(["evaluate", str(out)]) == 2
        assert "records no validation split" in capsys.readouterr().err
    finally:
        (out / "v.json").rename(out / "validation.json")


# --------------------------------------------------------------------------- 7. predict
def _tiny_onnx(path, labels, width=None, metadata=None):
    """uint8 NHWC image -> mean colour -> linear -> softmax, with zoo metadata (no torch export)."""
    import onnx
    from onnx import TensorProto, helper

    k = width or len(labels)
    w = np.random.default_rng(0).normal(size=(3, k)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]), onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = metadata if metadata is not None else json.dumps({
        "labels": labels, "preprocess": "normalize",
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 8, 8], "resize_size": 8}})
    helper.set_model_props(model, {"zoo.metadata": meta})
    onnx.save(model, str(path))
    return path


def test_predict_reports_bad_files_and_predicts_the_rest(tmp_path, capsys):
    model = _tiny_onnx(tmp_path / "m.onnx", ["a", "b"])
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (10, 10), (200, 0, 0)).save(imgs / "good.png")
    (imgs / "bad.jpg").write_bytes(b"nope")
    assert main(["predict", str(model), str(imgs), "--json"]) == 2
    captured = capsys.readouterr()
    rows = {os.path.basename(r["path"]): r for r in json.loads(captured.out)["predictions"]}
    assert len(rows["good.png"]["top"]) == 2 and "not a readable image" in rows["bad.jpg"]["error"]
    assert "1 of 2 files could not be read" in captured.err

    wrong = _tiny_onnx(tmp_path / "w.onnx", ["a", "b", "c"], width=2)
    assert main(["predict", str(wrong), str(imgs / "good.png")]) == 2
    assert "outputs 2 classes but its metadata lists 3 labels" in capsys.readouterr().err
    broken = _tiny_onnx(tmp_path / "b.onnx", ["a"], metadata="{oops")
    assert main(["predict", str(broken), str(imgs / "good.png")]) == 2
    assert "zoo metadata is damaged (JSONDecodeError" in capsys.readouterr().err


# --------------------------------------------------------------------------- 8. cache determinism (head)
def test_dropout_head_is_the_same_from_a_cold_or_a_warm_cache(base, tmp_path):
    import torch

    import zoo.training as T

    data, weights, d = base
    kw = train_kwargs(tmp_path, epochs=2, head="mlp", hidden=(16,), dropout=0.5, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = T.train(BACKBONE, data, weights=str(weights), **kw)
        warm = T.train(BACKBONE, data, weights=str(weights), **kw)
    assert cold.cache["misses"] > 0 and warm.cache["misses"] == 0
    for (k, a), (_, b) in zip(cold.model.head.state_dict().items(), warm.model.head.state_dict().items()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------- 9. permissions
def test_written_files_follow_the_umask(trained, tmp_path):
    from zoo.model import load_model, save_model

    old = os.umask(0o027)
    try:
        save_model(load_model(trained[1]), tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("head.safetensors", "backbone.safetensors", "model.json"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o640, name


# --------------------------------------------------------------------------- 10. every CLI error
def _bad_commands(t):
    run = str(t["run"])
    return [
        ["train", "--lr", "inf"], ["train", "--lr", "nan"], ["train", "--weight-decay", "nan"],
        ["train", "--dropout", "1.5"], ["train", "--label-smoothing", "5"], ["train", "--image-size", "0"],
        ["train", "--image-size", "1"], ["train", "--head", "mlp", "--hidden", "0"], ["train", "--val-split", "-0.5"],
        ["train", "--val-split", "nan"], ["train", "--epochs", "0"], ["train", "--freeze", "x"],
        ["train", "--views", "2"], ["train", "--data", str(t["tmp"] / "nope")],
        ["train", "--data", str(t["data"]), "--val-data", str(t["tmp"] / "nope")],
        ["train", "--backbone", "nope/nope", "--data", str(t["data"])],
        ["train", "--backbone", BACKBONE, "--weights", str(t["tmp"] / "no.safetensors"), "--data", str(t["data"])],
        ["train", "--backbone", BACKBONE, "--weights", "none", "--freeze", "99", "--data", str(t["data"])],
        ["train", "--bogus"], ["evaluate", str(t["tmp"] / "nope")], ["evaluate", run, "--batch-size", "0"],
        ["export", run, "--opset", "99"], ["export", run, "--opset", "1"], ["export", run, "--tolerance", "nan"],
        ["export", run, "--out", str(t["file"])], ["predict", str(t["tmp"] / "no.onnx"), "x.jpg"],
        ["predict", str(t["file"]), "x.jpg", "--top-k", "0"], ["predict", str(t["file"]), "x.jpg", "--top-k", "-3"],
        ["bench", "x", "--threads", "0"], ["bench", "x", "--timeout", "nan"], ["list", "--bogus"],
        ["info", "nope/nope"],
    ]


def test_every_cli_error_is_one_line_exit_2_no_traceback_nothing_written(trained, base, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    t = {"run": trained[1], "tmp": tmp_path, "data": base[0], "file": tmp_path / "afile"}
    before = sorted(p.name for p in tmp_path.iterdir())
    run_before = sorted(p.name for p in trained[1].iterdir())
    for argv in _bad_commands(t):
        with pytest.raises(SystemExit) as exit_:
            raise SystemExit(main(argv + ["--no-progress"] if argv[0] == "train" and "--bogus" not in argv
                                  else argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (argv, err)
        assert err.startswith(f"zoo {argv[0]}: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no run dir, no export dir
    assert sorted(p.name for p in trained[1].iterdir()) == run_before


def test_debug_shows_the_traceback(capsys):
    from zoo.options import OptionError

    with pytest.raises(OptionError):
        main(["train", "--lr", "inf", "--debug"])
