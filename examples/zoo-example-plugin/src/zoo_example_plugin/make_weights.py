"""python -m zoo_example_plugin.make_weights DIR: write DIR/tinynet-v1.safetensors (random weights,
seed 1, with a head over V1_LABELS): the kind of file the "v1" tag loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_weights(path, seed: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    from . import FEATURE_DIM, V1_LABELS, _tinynet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net, head = _tinynet(), torch.nn.Linear(FEATURE_DIM, len(V1_LABELS))
    tensors = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"head.{k}": v for k, v in head.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"labels": json.dumps(list(V1_LABELS))})
    return path


if __name__ == "__main__":
    from . import WEIGHTS_FILE

    print(write_weights(Path(sys.argv[1] if len(sys.argv) > 1 else ".") / WEIGHTS_FILE))
