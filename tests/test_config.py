"""Config validation: every field checked at construction; unknown keys are an error."""
import pytest

from bissl_kit.config import ConfigError
from bissl_kit.pretrain import PretrainConfig


def test_defaults_are_valid_and_round_trip():
    cfg = PretrainConfig()
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.5).lr == 0.5


@pytest.mark.parametrize("field,value,needle", [
    ("lr", 0.0, "lr=0.0 is out of range; lr must be > 0"),
    ("lr", "fast", "lr='fast' must be a number"),
    ("lr", float("nan"), "must be finite"),
    ("steps", 0, "steps=0 is out of range; steps must be >= 1"),
    ("steps", 2.5, "steps=2.5 must be an integer"),
    ("method", "moco", "method='moco' is not allowed; method must be one of 'simclr', 'byol'"),
    ("arch", "vit", "arch='vit' is not allowed"),
    ("byol_ema", 1.0, "byol_ema=1.0 is out of range; byol_ema must be >= 0 and < 1"),
    ("small_stem", 1, "small_stem=1 must be True or False"),
    ("crop_scale", (0.5, 0.2), "crop_scale=(0.5, 0.2) must be (low, high)"),
    ("crop_scale", (0.2,), "must have 2 elements"),
    ("device", "tpu", "device='tpu' is not allowed; device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("device", "cuda:x", "device='cuda:x' is not allowed; device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("warmup_steps", 400, "warmup_steps=400 must be < steps=200"),
    ("clip_grad_norm", -1.0, "clip_grad_norm=-1.0 is out of range"),
])
def test_bad_values_name_the_field_and_the_allowed_range(field, value, needle):
    with pytest.raises(ConfigError) as e:
        PretrainConfig(**{field: value})
    assert needle in str(e.value)


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown PretrainConfig parameter\(s\): 'lrr' \(did you mean 'lr'\?\)"):
        PretrainConfig.from_dict({"lrr": 0.1})


def test_lists_from_json_become_tuples_and_none_is_allowed_where_declared():
    cfg = PretrainConfig.from_dict({"crop_scale": [0.3, 0.9], "clip_grad_norm": None})
    assert cfg.crop_scale == (0.3, 0.9) and cfg.clip_grad_norm is None
