"""torchrun with two gloo processes on CPU trains the same head as one process on the same data
(the global batch is split across ranks and the loss scaled so DDP's average is the global mean),
and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import zoo
from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs

CONFIGS = {
    "cached": dict(epochs=3, batch_size=8),  # whole backbone frozen: features extracted per rank, gathered
    "partial": dict(epochs=2, batch_size=8, freeze=4, augment=True),  # images through DDP(model) each step
}


def assert_same_training(ddp: dict, single: dict, start: dict, what: str) -> None:
    """DDP trained the same parameters as one process, to float noise, judged against how far
    training moved them: per tensor, |ddp - single| <= 1e-3 * |single - start| + 1e-6 (Frobenius
    norms; `start` is the state before training, zeros where unknown). A tensor training did not
    move (frozen layers) must be bit-identical. A DDP that does not all-reduce, or scales the loss
    per rank, moves the parameters differently by a sizeable fraction of the update (negative
    control: test_same_training_rule_can_fail)."""
    assert ddp.keys() == single.keys(), f"{what}: {sorted(ddp.keys() ^ single.keys())}"
    for k, v in single.items():
        a, b = ddp[k].double(), v.detach().double()
        s0 = start[k].double() if k in start else torch.zeros_like(b)
        moved = (b - s0).norm().item()
        diff = (a - b).norm().item()
        if moved == 0:
            assert diff == 0, f"{what}: {k} did not move in one process but differs under DDP by {diff:.3g}"
        else:
            assert diff <= 1e-3 * moved + 1e-6, (f"{what}: {k} differs by {diff:.3g} between DDP and one process; "
                                                 f"training moved it by {moved:.3g} (allowed 1e-3 of that + 1e-6)")


def test_same_training_rule_can_fail():
    """Negative control for assert_same_training: a second rank that skipped its share of the update
    (half the step on every parameter) and a frozen tensor off by one ulp are both refused; noise
    in a few components of a moved tensor is accepted."""
    torch.manual_seed(0)
    start = {"w": torch.randn(64, 64), "frozen": torch.randn(8)}
    step = {"w": 1e-3 * torch.randn(64, 64), "frozen": torch.zeros(8)}
    single = {k: start[k] + step[k] for k in start}
    noisy = {k: v.clone() for k, v in single.items()}
    noisy["w"][0, :3] += 3e-5  # AdamW noise on near-zero gradient components
    assert_same_training(noisy, single, start, "noise")
    half = {k: start[k] + 0.5 * step[k] for k in start}
    with pytest.raises(AssertionError, match="differs by"):
        assert_same_training(half, single, start, "half step")
    ulp = {k: v.clone() for k, v in single.items()}
    ulp["frozen"][0] = torch.nextafter(ulp["frozen"][0], torch.tensor(1e9))
    with pytest.raises(AssertionError, match="did not move"):
        assert_same_training(ulp, single, start, "frozen")


@pytest.mark.timeout(240)
def test_two_gloo_processes_match_one(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    weights = random_weights_file(tmp_path / "w.safetensors")
    script = tmp_path / "ddp_job.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path[:0] = {sys.path!r}
        import torch
        torch.set_num_threads(1)
        import zoo, zoo.runs, zoo.model
        from trainhelpers import train_kwargs
        from pathlib import Path
        rank = int(os.environ["RANK"])
        if rank != 0:  # only rank 0 may write the run directory
            def refuse(*a, **k):
                raise AssertionError(f"rank {{rank}} tried to write the run directory")
            zoo.runs.save_checkpoint = zoo.runs.write_history = zoo.model.save_model = refuse
            zoo.runs.plot_curves = zoo.runs.plot_confusion = refuse
        for name, cfg in {CONFIGS!r}.items():
            run = zoo.train({BACKBONE!r}, {str(data)!r}, weights={str(weights)!r}, out=Path({str(tmp_path)!r}) / name,
                            **train_kwargs(Path({str(tmp_path)!r}) / "ddp", **cfg))
            Path({str(tmp_path)!r}, f"{{name}}-rank{{rank}}.json").write_text(json.dumps(
                {{"world": torch.distributed.get_world_size(), "cache": run.cache, "val": run.val_top1}}))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: none may outlive the test
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 150s:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    for name, cfg in CONFIGS.items():
        reports = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world"] == 2 for r in reports)
        assert reports[0]["val"] == reports[1]["val"]  # every rank saw the same global metrics
        # Like with like: the single process runs with the ranks' thread count (1), so both sides use
        # the same kernels; what still differs is the order of the gradient sums (two half-batches
        # all-reduced vs one batch), float noise that AdamW turns into up to ~lr per step wherever a
        # gradient component is itself near zero.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = zoo.train(BACKBONE, data, weights=str(weights), **train_kwargs(tmp_path / "single", **cfg))
        finally:
            torch.set_num_threads(threads)
        ddp_head = load_file(str(tmp_path / name / "head.safetensors"))
        assert_same_training(ddp_head, single.model.head.state_dict(), {}, f"{name}: head")
        if name == "cached":
            assert reports[0]["cache"]["misses"] == 24  # all 24 images extracted once, split over two ranks
        else:
            ddp_backbone = load_file(str(tmp_path / name / "backbone.safetensors"))
            assert_same_training(ddp_backbone, single.model.backbone.state_dict(), load_file(str(weights)),
                                 f"{name}: backbone")
        assert single.val_top1 == pytest.approx(reports[0]["val"])
