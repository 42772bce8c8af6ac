"""Classify images with an exported file alone: ONNX with onnxruntime, numpy and Pillow, no torch;
`.pt2` and TorchScript files with torch (through their exporter plugin's runner).

    from zoo.predict import Predictor
    p = Predictor("export/model.onnx")
    p.predict_files(["cat.jpg"], top_k=3)   # [{"path": ..., "top": [{"label", "index", "probability"}, ...]}]

Everything needed comes from the file's metadata (written by `zoo export`): the labels, the
resize/crop/interpolation, mean/std, and whether preprocessing is baked into the graph. Images go
through `zoo.preprocess`, the same reference preprocessing training and validation use; a
`--preprocess full` file gets the decoded image as it is (it resizes and crops inside), one
image per run, since images differ in size.

Nothing here may import torch, even indirectly (a test runs it with torch made unimportable):
`zoo` itself is lazy, and zoo.preprocess and zoo.errors are torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DataError, ZooError
from .preprocess import ImageDecodeError, list_images, load_image, normalize_uint8, resize_crop, to_rgb, to_uint8_hwc

BATCH = 16


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


class Predictor:
    """A loaded model file plus the preprocessing and labels it describes.

    `.onnx` runs in an onnxruntime session (no torch). Another format runs where its exporter plugin
    offers a runner (`Exporter.load_runner(path) -> (run, metadata)`, duck-typed, optional): the
    built-in `.pt2` (weights-only load) and `.torchscript.pt` exporters do, and need torch."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ZooError(f"{self.path!r} does not exist (expected a model file written by `zoo export`: "
                           ".onnx, .pt2 or .torchscript.pt)")
        self.session = None
        self._runner = None
        if not self.path.endswith(".onnx"):
            self._runner, meta = _load_runner(self.path)
            if self._runner is not None:
                self.metadata = self._check_metadata(dict(meta or {}))
                self.labels = list(self.metadata["labels"])
                self.preprocess_mode = self.metadata.get("preprocess", "none")
                self.normalization = self.metadata["normalization"]
                self.input_name = "input"
                self.output_names = list(self.metadata.get("outputs") or ["logits", "probabilities", "embedding"])
                return
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(self.path, so, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:
            raise ZooError(f"{self.path!r}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc
        self.metadata: dict[str, Any] = self._check_metadata(_metadata(self.path, self.session))
        self.labels: list[str] = list(self.metadata["labels"])
        self.preprocess_mode: str = self.metadata.get("preprocess", "none")
        self.normalization = self.metadata["normalization"]
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "probabilities" not in self.output_names and "logits" not in self.output_names:
            raise ZooError(f"{self.path!r} has neither a 'probabilities' nor a 'logits' output: {self.output_names}")
        for out in self.session.get_outputs():
            width = out.shape[-1] if out.name in ("probabilities", "logits") and out.shape else None
            if isinstance(width, int) and width != len(self.labels):
                raise ZooError(self._label_mismatch(width))

    def _check_metadata(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The zoo metadata, checked: a list of labels and a normalization."""
        bad = f"{self.path!r}: its zoo metadata is damaged"
        fix = "export the model again with `zoo export`"
        if not isinstance(meta, dict):
            raise ZooError(f"{bad}: not a JSON object; {fix}")
        labels = meta.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ZooError(f"{bad}: 'labels' is not a list of class names; {fix}")
        norm = meta.get("normalization")
        if not isinstance(norm, dict) or not all(k in norm for k in ("mean", "std", "input_size", "resize_size")):
            raise ZooError(f"{bad}: 'normalization' is missing or incomplete; {fix}")
        return meta

    def _label_mismatch(self, width: int) -> str:
        return (f"{self.path!r}: the model outputs {width} classes but its metadata lists {len(self.labels)} labels; "
                "the file is inconsistent: export it again with `zoo export`")

    # -- preprocessing ---------------------------------------------------------------------------
    def prepare(self, image) -> np.ndarray:
        """One PIL image or file path -> one row of this model's input (uint8 NHWC or float NCHW)."""
        try:
            img = load_image(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
        except ImageDecodeError as exc:
            raise DataError(str(exc)) from exc
        if self.preprocess_mode == "full":  # the graph resizes and crops: the image as decoded
            return to_uint8_hwc(img)[None]
        pixels = to_uint8_hwc(resize_crop(img, self.normalization))[None]
        return pixels if self.preprocess_mode == "normalize" else normalize_uint8(pixels, self.normalization)

    # -- running -----------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The raw outputs for a prepared batch, by name."""
        if self._runner is not None:
            return dict(self._runner(batch))
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))

    def probabilities(self, images: Iterable) -> np.ndarray:
        return self._run_rows([self.prepare(img) for img in images])

    def _run_rows(self, rows: list) -> np.ndarray:
        if not rows:
            return np.zeros((0, len(self.labels)), np.float32)
        out = []
        step = 1 if self.preprocess_mode == "full" else BATCH  # "full" rows differ in size
        for i in range(0, len(rows), step):
            res = self.run(np.concatenate(rows[i:i + step]))
            if "probabilities" in res:
                probs = res["probabilities"]
            else:
                z = res["logits"] - res["logits"].max(1, keepdims=True)
                probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            if probs.shape[-1] != len(self.labels):
                raise ZooError(self._label_mismatch(probs.shape[-1]))
            out.append(probs)
        return np.concatenate(out)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[Prediction]]:
        if int(k) < 1:
            raise ZooError(f"top_k must be >= 1, got {k!r}")
        k = min(int(k), probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[Prediction(self.labels[j], int(j), float(p[j])) for j in row] for p, row in zip(probs, order)]

    def predict(self, images: Iterable, top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for PIL images or paths."""
        return self.top_k(self.probabilities(images), top_k)

    def predict_files(self, inputs: Sequence[str | os.PathLike], top_k: int = 5) -> list[dict[str, Any]]:
        """Files and folders (searched recursively) -> [{"path", "top": [...]}], in input order.
        A file that cannot be read gets {"path", "error"} instead; the others are predicted."""
        if int(top_k) < 1:
            raise ZooError(f"--top-k must be an integer >= 1, got {top_k!r}")
        paths = expand_inputs(inputs)
        rows: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for p in paths:
            try:
                rows[p] = self.prepare(p)
            except DataError as exc:
                errors[p] = str(exc)
        good = [p for p in paths if p in rows]
        results = dict(zip(good, self.top_k(self._run_rows([rows[p] for p in good]), top_k))) if good else {}
        return [{"path": p, "error": errors[p]} if p in errors else
                {"path": p, "top": [r.to_dict() for r in results[p]]} for p in paths]


def _load_runner(path: str):
    """(run, metadata) from the exporter plugin that writes this format, if it offers a runner;
    (None, None) when it does not (the file is then tried as ONNX)."""
    from .plugin import registry

    exporter = registry.exporters().for_artifact(path)
    load = getattr(exporter, "load_runner", None) if exporter is not None else None
    if load is None:
        return None, None
    try:
        return load(path)
    except ZooError:
        raise
    except Exception as exc:
        raise ZooError(f"{path!r}: the {exporter.name!r} exporter cannot load it ({type(exc).__name__}: {exc}); "
                       "export the model again with `zoo export`") from exc


def torch_runner(module, names: Sequence[str]):
    """A numpy-in, numpy-out runner for a torch-loaded artifact (for `Exporter.load_runner`): torch
    is imported here, by the formats that need it, never by the ONNX path."""
    import torch

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(batch)))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    return run


def _metadata(path: str, session) -> dict[str, Any]:
    """The zoo metadata in the file, read by the exporter plugin that writes this format (the one
    place that knows where it lives)."""
    from .plugin import registry

    reg = registry.exporters()
    exporter = reg.for_artifact(path)
    candidates = [exporter] if exporter is not None else [reg.get(n) for n in reg.names()]
    for candidate in candidates:
        try:
            meta = candidate.read_metadata(session)
        except Exception as exc:  # noqa: BLE001 - not this exporter's kind of artifact, or damaged
            if exporter is not None:  # the format's own reader failed: the metadata is damaged
                raise ZooError(f"{path!r}: its zoo metadata is damaged ({type(exc).__name__}: {exc}); export the "
                               "model again with `zoo export`") from None
            continue
        if meta:
            return dict(meta)
    raise ZooError(f"{path!r} carries no zoo metadata"
                   + (f" (read by the {exporter.name!r} exporter)" if exporter is not None else "")
                   + ": export it with `zoo export` so it knows its labels and preprocessing")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    paths: list[str] = []
    for item in inputs:
        if not os.path.exists(item):
            raise DataError(f"{os.fspath(item)!r} does not exist")
        found = list_images(item)
        if not found:
            raise DataError(f"{os.fspath(item)!r}: no image files found (looked for {', '.join(_suffixes())})")
        paths.extend(found)
    return paths


def _suffixes() -> list[str]:
    from .preprocess import IMAGE_SUFFIXES

    return list(IMAGE_SUFFIXES)


def predict(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], top_k: int = 5) -> list[dict[str, Any]]:
    """One-shot: `Predictor(model_path).predict_files(images, top_k)`."""
    return Predictor(model_path).predict_files(images, top_k)
