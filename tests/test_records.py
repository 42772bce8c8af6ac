import pytest

from zoo.errors import InvalidRecordError
from zoo.records import BackboneSpec, Normalization, WeightsInfo

GOOD = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, 224, 224), resize_size=256)


def test_valid_normalization_and_crop_pct():
    n = Normalization(**GOOD).validate()
    assert n.crop_pct == pytest.approx(0.875)
    assert Normalization.from_dict(n.to_dict()) == n


def test_from_crop_pct_matches_timm_rounding():
    n = Normalization.from_crop_pct((0.5,) * 3, (0.5,) * 3, (3, 224, 224), 0.875)
    assert n.resize_size == 256
    n = Normalization.from_crop_pct((0.5,) * 3, (0.5,) * 3, (3, 448, 448), 1.15)  # timm volo: crop_pct > 1
    assert n.validate().resize_size == 389


@pytest.mark.parametrize("change, fragment", [
    (dict(std=(0.2, 0.0, 0.2)), "std must be > 0"),
    (dict(std=(0.2, -1.0, 0.2)), "std must be > 0"),
    (dict(mean=(0.5, 0.5)), "one value per input channel"),
    (dict(std=(0.5,) * 4), "one value per input channel"),
    (dict(mean=(float("nan"), 0.5, 0.5)), "finite"),
    (dict(input_size=(224, 224)), "input_size"),
    (dict(interpolation="cubic-ish"), "interpolation"),
    (dict(resize_size=0), "resize_size"),
])
def test_invalid_normalization_is_refused_with_what_and_why(change, fragment):
    with pytest.raises(InvalidRecordError, match=fragment) as err:
        Normalization(**{**GOOD, **change}).validate("acme/net")
    assert "acme/net" in str(err.value)


def test_spec_validation():
    spec = BackboneSpec("acme", "net", weights=(WeightsInfo("a"), WeightsInfo("b")), default_weights="a")
    assert spec.validate().name == "acme/net"
    with pytest.raises(InvalidRecordError, match="default_weights"):
        BackboneSpec("acme", "net", weights=(WeightsInfo("a"),), default_weights="zzz").validate()
    with pytest.raises(InvalidRecordError, match="duplicate"):
        BackboneSpec("acme", "net", weights=(WeightsInfo("a"), WeightsInfo("a"))).validate()
    with pytest.raises(InvalidRecordError, match="without '/'"):
        BackboneSpec("acme/x", "net").validate()
