"""The built-in extraction engines (eager, channels_last, bf16, compile), registered through the
`zoo_register_engines` hook like any third party's (entry point `engines` in the `zoo` group).

Kept apart from zoo.features.engines (the choice among engines) because plugin discovery imports
this module: it must not import torch until an engine is prepared.
"""

from __future__ import annotations

from typing import Any

from ..plugin.api import EngineRejected, ExtractionEngine, PreparedEngine
from ..plugin.hookspecs import hookimpl


def _flat(f):
    return f.float().flatten(1)


def bf16_supported(device: Any) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # native bf16 (AVX512-BF16 / AMX); without it autocast emulates bf16 and is slower than fp32
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001
            return False
    return False


class Eager(ExtractionEngine):
    """The module as it is, NCHW fp32: the reference every other engine is checked against."""

    name = "eager"
    description = "the module as is, NCHW fp32 (the reference)"

    def prepare(self, backbone, example, device, *, workdir, threads) -> PreparedEngine:
        import torch

        backbone.eval().to(memory_format=torch.contiguous_format)
        return PreparedEngine(lambda x: _flat(backbone(x.contiguous())))


class ChannelsLast(ExtractionEngine):
    """NHWC memory format, fp32: oneDNN and cuDNN pick faster kernels for it."""

    name = "channels_last"
    description = "NHWC memory format, fp32"

    def prepare(self, backbone, example, device, *, workdir, threads) -> PreparedEngine:
        import torch

        backbone.eval().to(memory_format=torch.channels_last)
        return PreparedEngine(lambda x: _flat(backbone(x.contiguous(memory_format=torch.channels_last))))


class Bf16(ExtractionEngine):
    """channels_last under bf16 autocast, where the device has native bf16 (CUDA; CPUs with
    AVX512-BF16 or AMX): reduced precision, cached apart, chosen by auto only with --amp bf16."""

    name = "bf16"
    numerics = "bf16"
    description = "channels_last under bf16 autocast (native bf16 only; --amp bf16 lets auto use it)"

    def unavailable(self, device) -> str | None:
        return None if bf16_supported(device) else f"no native bf16 on {device.type} here"

    def prepare(self, backbone, example, device, *, workdir, threads) -> PreparedEngine:
        import torch

        why = self.unavailable(device)
        if why:
            raise EngineRejected(why)
        backbone.eval().to(memory_format=torch.channels_last)

        def run(x):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return _flat(backbone(x.contiguous(memory_format=torch.channels_last)))

        return PreparedEngine(run)


class Compile(ExtractionEngine):
    """torch.compile (inductor), channels_last: minutes of compilation, so auto tries it only on
    jobs of 20,000 images or more (`auto_min_images`)."""

    name = "compile"
    description = "torch.compile (inductor): minutes to compile; auto tries it on 20,000+ images"
    auto_min_images = 20000
    prior_speedup = 1.2

    def prepare_seconds(self, backbone, workdir) -> float | None:
        return None  # unknown, and large (compilation)

    def prepare(self, backbone, example, device, *, workdir, threads) -> PreparedEngine:
        import torch

        backbone.eval().to(memory_format=torch.channels_last)
        compiled = torch.compile(backbone, dynamic=False)
        return PreparedEngine(lambda x: _flat(compiled(x.contiguous(memory_format=torch.channels_last))))


@hookimpl
def zoo_register_engines(register):
    for engine in (Eager(), ChannelsLast(), Bf16(), Compile()):
        register(engine)
