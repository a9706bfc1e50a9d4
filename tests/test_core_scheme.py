"""QuantScheme: validation, labels, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from holdall.core.scheme import QuantScheme
from holdall.errors import ConfigError


@pytest.mark.parametrize(
    "scheme, label",
    [
        (QuantScheme(), "int4-g128-sym"),
        (QuantScheme(symmetric=False), "int4-g128-asym"),
        (QuantScheme(bits=8, granularity="channel"), "int8-ch-sym"),
        (QuantScheme(bits=3, granularity="tensor", scale_dtype="float32"), "int3-t-sym-f32"),
        (QuantScheme(bits=2, group_size=64, scale_dtype="bfloat16", double_quant=True), "int2-g64-sym-bf16-dq"),
        (QuantScheme(dtype="nf4", group_size=64), "nf4-b64"),
        (QuantScheme(dtype="nf4", group_size=64, double_quant=True), "nf4-b64-dq"),
        (QuantScheme(dtype="fp4", group_size=128), "fp4-b128"),
    ],
)
def test_label(scheme, label):
    assert scheme.label == label
    assert str(scheme) == label


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dtype="nf4", bits=8), ["nf4", "bits=4"]),
        (dict(dtype="fp4", bits=3), ["fp4", "bits=4"]),
        (dict(bits=7), ["bits", "(2, 3, 4, 5, 6, 8)"]),
        (dict(bits=1), ["bits"]),
        (dict(bits=4.0), ["integer"]),
        (dict(group_size=0), ["group_size", "positive"]),
        (dict(group_size=-128), ["group_size"]),
        (dict(group_size=True), ["group_size"]),
        (dict(dtype="int5"), ["dtype", "int"]),
        (dict(granularity="row"), ["granularity", "channel"]),
        (dict(scale_dtype="float64"), ["scale_dtype", "float16"]),
        (dict(symmetric="yes"), ["symmetric"]),
        (dict(dtype="nf4", symmetric=False), ["symmetric=True"]),
        (dict(dtype="nf4", granularity="channel"), ["granularity"]),
    ],
)
def test_invalid_schemes_name_cause_and_fix(kwargs, words):
    with pytest.raises(ConfigError) as info:
        QuantScheme(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_dict_round_trip_through_json():
    for scheme in (QuantScheme(), QuantScheme(dtype="nf4", group_size=64, double_quant=True),
                   QuantScheme(bits=6, granularity="channel", symmetric=False, scale_dtype="bfloat16")):
        data = json.loads(json.dumps(scheme.to_dict()))
        assert QuantScheme.from_dict(data) == scheme


def test_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(ConfigError, match="groupsize"):
        QuantScheme.from_dict({"groupsize": 64})
    with pytest.raises(ConfigError, match="dict"):
        QuantScheme.from_dict([("bits", 4)])


def test_frozen_and_hashable():
    scheme = QuantScheme()
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 8  # type: ignore[misc]
    assert len({QuantScheme(), QuantScheme()}) == 1
