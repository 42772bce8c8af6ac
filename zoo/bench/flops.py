"""FLOPs from PyTorch's own counter (torch.utils.flop_counter.FlopCounterMode).

The counter counts matmul/conv-like ops (multiply-add = 2 FLOPs); elementwise ops are not
counted, so attention-heavy or activation-heavy models are slightly under-counted.
"""

from __future__ import annotations


def forward_gflops(module, image_size: int, batch_size: int = 1, device: str = "cpu") -> float:
    """GFLOPs of one forward pass per image, in eval mode with no autograd."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    x = torch.zeros(batch_size, 3, image_size, image_size, device=device)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(x)
        return counter.get_total_flops() / 1e9 / batch_size
    finally:
        module.train(was_training)
