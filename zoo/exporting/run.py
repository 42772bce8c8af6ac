"""One export, in named phases: `plan` (everything checked before anything is written),
`_reference` (the validation images, eager PyTorch's outputs on them, calibration images),
`_export_one` per format (export into a staging folder, validate fail-closed) and `_commit`
(move a passed artifact and its sidecar into place), the report written either way."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ExportValidationError, ZooError
from ..io import file_sha256, write_json
from ..plugin.api import ExportOptions
from .artifact import ARTIFACT_STEM, check_preprocess, quiet, versions
from .budget import StepTimeout, budget, resolve_budget
from .images import QUANTIZED_VALIDATION_IMAGES, _calibration_images, _validation_images
from .plan import _implements, _output_folder, check_requirements, exporter_options, resolve_formats


@dataclass(frozen=True)
class Plan:
    """What will be exported, where, with which options: decided before anything is written."""

    names: list[str]
    specs: dict[str, Any]
    own_options: dict[str, dict[str, Any]]
    out: Path
    batch_sizes: tuple[int, ...]
    step_budget: float  # seconds each step (reference, each format's export and validation) may take


@dataclass(frozen=True)
class Reference:
    """What every artifact is compared with: the images, eager PyTorch's outputs on them (None
    with validate=False), the tolerance, and the calibration images for quantized formats."""

    tolerance: Any
    vimages: Any
    outputs: dict[str, Any] | None
    calibration: tuple[Any, str] | None
    # quantized formats: the run's whole validation split (capped) and eager outputs on it
    qimages: Any = None
    qoutputs: dict[str, Any] | None = None


def run_export(model, run_dir, formats, out, preprocess, quantize, tolerance, images, embedding,
               batch_sizes, int8_agreement, validate, progress, given, strict=False,
               step_budget: float | None = None) -> dict[str, Any]:
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    plan = _plan(model, run_dir, formats, out, preprocess, quantize, batch_sizes, given, step_budget)
    t1 = time.perf_counter()
    with budget("the reference step (validation images and eager PyTorch's outputs)", plan.step_budget):
        ref = _reference(model, run_dir, plan, preprocess, tolerance, int8_agreement, images, validate, say, strict)
    seconds: dict[str, Any] = {"plan": round(t1 - t0, 2), "reference": round(time.perf_counter() - t1, 2)}
    report: dict[str, Any] = {
        "status": "running",
        "model": {"backbone": model.meta.backbone, "weights": model.meta.weights,
                  "labels": list(model.meta.labels), "run": str(run_dir) if run_dir else None},
        "out": str(plan.out),
        "options": {"formats": plan.names, "preprocess": preprocess, "quantize": quantize, "embedding": embedding,
                    "batch_sizes": list(plan.batch_sizes), "validate": validate, "exporters": plan.own_options,
                    "step_budget_seconds": round(plan.step_budget, 1)},
        "tolerance": ref.tolerance.to_dict(),
        "images": ref.vimages.to_dict(),
        **({"calibration": {"source": ref.calibration[1], "count": int(len(ref.calibration[0]))}}
           if ref.calibration else {}),
        "versions": versions(*plan.names),
        "seconds": seconds,  # per step: plan, reference (images + eager outputs), then per format
        "artifacts": {},
    }
    validated: dict[str, str] = {}  # format -> final path, for exporters that build on another (int8)
    failed: list[str] = []
    for name in plan.names:
        t = time.perf_counter()
        entry = _export_one(model, name, plan, ref, preprocess, embedding, validate, validated, report, say)
        seconds[name] = {"export": entry.get("export_seconds"), "validate": (entry.get("validation") or {}).get("seconds"),
                         "total": round(time.perf_counter() - t, 2)}
        if entry["status"] in ("failed", "skipped"):
            failed.append(name)
        else:
            validated[name] = entry["path"]
    report["status"] = "failed" if failed else "passed"
    seconds["total"] = round(time.perf_counter() - t0, 2)
    _write_report(plan.out, report)
    if failed:
        err = ExportValidationError(
            "export failed validation for " + ", ".join(failed) + "; nothing of this export was put in place for "
            + ("it" if len(failed) == 1 else "them")
            + "".join(f" ({Path(report['artifacts'][n]['previous']['path']).name}: the earlier export is kept)"
                      for n in failed if report["artifacts"][n].get("previous"))
            + f"; numbers in {plan.out / 'export-report.json'}: "
            + " | ".join(f"{n}: " + "; ".join((report['artifacts'][n].get('validation') or {}).get('problems')
                                                 or [report['artifacts'][n].get('reason', '')]) for n in failed))
        err.report = report
        raise err
    return report


def _plan(model, run_dir, formats, out, preprocess, quantize, batch_sizes, given, step_budget=None) -> Plan:
    """Everything checked before anything is written."""
    from ..plugin import registry

    batch_sizes = tuple(int(b) for b in batch_sizes)
    if out is None:
        if run_dir is None:
            raise ZooError("export(model, ...) needs out=: where to write the artifacts")
        out = run_dir / "export"
    check_preprocess(model, preprocess)
    reg = registry.exporters()
    names = resolve_formats(formats, quantize, reg)
    specs = {name: reg.get(name) for name in names}  # unknown names fail before any work
    for name, spec in specs.items():
        check_requirements(name, spec)
        if preprocess not in spec.preprocess_modes:
            raise ZooError(f"export format {name!r} does not write --preprocess {preprocess} artifacts (it writes "
                           f"{', '.join(spec.preprocess_modes)}); choose another format or preprocessing mode")
    own_options = exporter_options(specs, given)
    seconds = resolve_budget(step_budget, model)
    out = _output_folder(Path(out))
    sweep_staging(out)
    return Plan(names, specs, own_options, out, batch_sizes, seconds)


def _reference(model, run_dir, plan: Plan, preprocess, tolerance, int8_agreement, images, validate, say,
               strict: bool = False) -> Reference:
    """The images, eager PyTorch's outputs on them and the calibration images."""
    from ..validation import Tolerance, eager_outputs, full_validation_images

    # `tolerance` (--tolerance TOL) sets the fp32 bound TOL x (1 + max|eager logit|): atol = rtol = TOL
    tol = Tolerance(**{k: v for k, v in (("logits", tolerance), ("logits_rtol", tolerance),
                                         ("int8_agreement", int8_agreement)) if v is not None})
    model.eval()
    full = preprocess == "full"
    vimages = _validation_images(images, model, run_dir, say, raw=full, strict=strict)
    for line in vimages.skipped:
        say(f"validation images: skipped unreadable {line}")
    if full:  # the artifact gets the images at their own sizes; the reference, Pillow's resize of them
        vimages = full_validation_images(vimages, model.meta.normalization)
    outputs = eager_outputs(model, vimages.pixels) if validate else None
    quantized = any(getattr(spec, "quantization", None) for spec in plan.specs.values())
    calibration = _calibration_images(model, run_dir, vimages, say) if quantized else None
    qimages, qoutputs = vimages, outputs
    if quantized and images is None and run_dir is not None and not full:
        qimages = _validation_images(images, model, run_dir, lambda msg: None, limit=QUANTIZED_VALIDATION_IMAGES)
        if len(qimages.pixels) != len(vimages.pixels):
            say(f"quantized formats: validating on {qimages.source}")
            qoutputs = eager_outputs(model, qimages.pixels) if validate else None
        else:
            qimages = vimages
    return Reference(tol, vimages, outputs, calibration, qimages, qoutputs)


def _export_one(model, name: str, plan: Plan, ref: Reference, preprocess, embedding, validate,
                validated: Mapping[str, str], report: dict[str, Any], say) -> dict[str, Any]:
    """Export one format into a staging folder and validate it; a passed (or unvalidated)
    artifact is committed into place, a failed one deleted. Returns its report entry (also put
    into `report["artifacts"]`); an exporter's unexpected error is re-raised after the report
    records it."""
    from ..plugin import registry

    out = plan.out
    spec = plan.specs[name]
    entry: dict[str, Any] = {"format": name, "plugin": registry.exporters().owner(name)}
    report["artifacts"][name] = entry
    final = out / f"{ARTIFACT_STEM}{spec.suffix}"
    if spec.builds_on in plan.names and spec.builds_on not in validated:
        entry.update(status="skipped", reason=f"the {spec.builds_on!r} export it builds on did not pass")
        _keep_previous(entry, final)
        return entry
    # the pid in the name: a later export sweeps the folders of processes that died (`sweep_staging`)
    staging = Path(tempfile.mkdtemp(prefix=f".{ARTIFACT_STEM}.{name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=out))
    staged = staging / final.name
    full = preprocess == "full"
    calibration = ref.calibration
    options = ExportOptions(preprocess=preprocess, embedding=embedding, artifacts=dict(validated),
                            options=plan.own_options[name],
                            calibration=calibration[0] if calibration and spec.quantization else None)
    t0 = time.perf_counter()
    export_report: dict[str, Any] = {}
    try:
        say(f"{name}: exporting")
        with quiet(), budget(f"export format {name!r}: the export step", plan.step_budget):
            export_report = spec.export(model, str(staged), options) or {}
        entry["export"] = _jsonable(export_report)
        if export_report.get("fallback"):  # e.g. ONNX: dynamo exporter missing -> TorchScript-based
            report.setdefault("fallbacks", {})[name] = _jsonable(export_report["fallback"])
        entry["export_seconds"] = round(time.perf_counter() - t0, 2)
        if not staged.exists():
            raise ZooError(f"exporter {name!r} did not write {staged.name}")
        if validate and _implements(spec, "validate"):
            say(f"{name}: validating against eager PyTorch at batch sizes {list(plan.batch_sizes)}")
            t1 = time.perf_counter()
            try:
                vimages, outputs = ((ref.qimages, ref.qoutputs) if spec.quantization and ref.qimages is not None
                                    else (ref.vimages, ref.outputs))
                if vimages is not ref.vimages:
                    entry["images"] = vimages.to_dict()
                with quiet(), budget(f"export format {name!r}: the validation step", plan.step_budget):
                    result = spec.validate(model, str(staged), vimages.raw if full else vimages.pixels,
                                           options, outputs, ref.tolerance, plan.batch_sizes, vimages.targets)
                vrep = verdict(name, result).to_dict()
            except (ExportValidationError, StepTimeout):
                raise
            except Exception as exc:  # an artifact that cannot even be run fails, it is not an error
                vrep = {"passed": False, "problems": [f"running the artifact failed: {type(exc).__name__}: {exc}"]}
            vrep = _jsonable(vrep)
            vrep["seconds"] = round(time.perf_counter() - t1, 2)
            entry["validation"] = vrep
            entry["status"] = "passed" if vrep.get("passed") else "failed"
        else:
            entry["validation"] = None
            entry["status"] = "unvalidated"
            entry["reason"] = ("validate=False" if not validate
                               else f"exporter {name!r} provides no validate(); the artifact is not checked")
    except ExportValidationError as exc:
        entry["status"] = "failed"
        entry["validation"] = _jsonable(getattr(exc, "report", None) or {"passed": False, "problems": [str(exc)]})
    except BaseException as exc:  # an exporter's error, or Ctrl-C / SystemExit: the staging folder goes too
        shutil.rmtree(staging, ignore_errors=True)
        interrupted = not isinstance(exc, Exception)
        status = "interrupted" if interrupted else "timed out" if isinstance(exc, StepTimeout) else "error"
        entry.update(status=status, error=f"{type(exc).__name__}: {exc}")
        _keep_previous(entry, final)
        report["status"] = status
        _write_report(out, report)
        raise
    if entry["status"] == "failed":
        shutil.rmtree(staging, ignore_errors=True)  # the bad artifact goes, never into place
        entry["path"] = None
        _keep_previous(entry, final)  # an earlier validated file stays; the report says it is not this one
        say(f"{name}: FAILED validation: {'; '.join(entry['validation'].get('problems', []))}")
        return entry
    _commit(staging, staged, final, entry, export_report)
    say(f"{name}: {entry['status']} -> {final}")
    return entry


STAGING_SUFFIX = ".staging"


def sweep_staging(out: Path) -> list[str]:
    """Remove staging folders left in `out` by exports that died (kill -9, power loss): those
    whose process id is no longer running, or that carry none. Returns their names."""
    swept = []
    for item in out.glob(f".{ARTIFACT_STEM}.*{STAGING_SUFFIX}"):
        parts = item.name.split(".")
        pid = int(parts[3]) if len(parts) > 4 and parts[3].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another export writing into the same folder right now
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
            swept.append(item.name)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _keep_previous(entry: dict[str, Any], final: Path) -> None:
    """A format that did not pass leaves an earlier artifact in `out` as it was (nothing the
    user had is lost); its entry says that file is the previous export, not this one."""
    if final.exists():
        sidecar = final.with_name(final.name + ".json")
        entry["previous"] = {"path": str(final), "kept": True,
                             "sidecar": str(sidecar) if sidecar.exists() else None,
                             "note": f"{final.name} in place is an earlier export, not this one (which did not pass)"}


def _commit(staging: Path, staged: Path, final: Path, entry: dict[str, Any], export_report: Mapping[str, Any]) -> None:
    """The sidecar written next to the staged artifact, then every staged file moved into place."""
    out = final.parent
    sidecar_name = final.name + ".json"
    sidecar = dict(export_report.get("metadata") or {})
    sidecar.update(artifact=final.name, sha256=file_sha256(staged), status=entry["status"],
                   validation=_summary(entry.get("validation")))
    write_json(staging / sidecar_name, _jsonable(sidecar))
    moved = []
    for item in sorted(staging.iterdir()):
        os.replace(item, out / item.name)
        moved.append(item.name)
    shutil.rmtree(staging, ignore_errors=True)
    if "export" in entry:  # no staging path leaks into the report
        entry["export"] = _rebased(entry["export"], str(staging), str(out))
    entry.update(path=str(final), files=moved, size_bytes=final.stat().st_size, sha256=sidecar["sha256"])


def _rebased(obj: Any, old: str, new: str) -> Any:
    """An exporter's report with the paths it gave into its staging folder pointed at the final place."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj.startswith(old) else obj
    if isinstance(obj, dict):
        return {k: _rebased(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebased(v, old, new) for v in obj]
    return obj


def verdict(name: str, result: Any):
    """An exporter's validate() answer as a ValidationResult; anything without a boolean `passed`
    fails, saying so (a missing verdict never counts as a pass)."""
    from ..plugin.api import ValidationResult

    if isinstance(result, ValidationResult) and isinstance(result.passed, bool):
        return result
    if isinstance(result, Mapping) and isinstance(result.get("passed"), bool):
        return ValidationResult.from_report(result)
    got = (f"{type(result).__name__} with passed={result.passed!r}" if isinstance(result, ValidationResult)
           else f"{type(result).__name__} without a boolean 'passed'")
    return ValidationResult(passed=False, problems=[
        f"exporter {name!r}: validate() returned {got}; it must return zoo.ValidationResult(passed=True/False, "
        "problems=[...]) so the artifact can be judged"])


def _summary(v: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not v:
        return None
    keys = ("passed", "kind", "max_abs_logit_diff", "logit_diff_to_bound", "rule", "mean_abs_logit_diff", "max_abs_prob_diff", "top1_agreement",
            "min_embedding_cosine", "max_batch_size_diff", "batch_sizes", "tolerance", "images", "accuracy",
            "dynamic_batch")
    return {k: v[k] for k in keys if k in v}


def _write_report(out: Path, report: Mapping[str, Any]) -> None:
    write_json(out / "export-report.json", _jsonable(report))


def _jsonable(obj: Any) -> Any:
    """Numbers and containers only (numpy scalars -> Python), so reports always serialize."""
    import math

    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
