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
        single = zoo.train(BACKBONE, data, weights=str(weights), **train_kwargs(tmp_path / "single", **cfg))
        ddp_head = load_file(str(tmp_path / name / "head.safetensors"))
        for k, v in single.model.head.state_dict().items():
            torch.testing.assert_close(ddp_head[k], v, atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
        if name == "cached":
            assert reports[0]["cache"]["misses"] == 24  # all 24 images extracted once, split over two ranks
        else:
            ddp_backbone = load_file(str(tmp_path / name / "backbone.safetensors"))
            for k, v in single.model.backbone.state_dict().items():
                torch.testing.assert_close(ddp_backbone[k], v, atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
        assert single.val_top1 == pytest.approx(reports[0]["val"])
