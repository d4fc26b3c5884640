"""XrayCapConfig: presets, overrides, validation, save/load round trip, timm vision configs, old config files."""

import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from testing_utils import REPO_ROOT  # noqa: F401  (puts the repo root on sys.path)
from transformers import AutoConfig, GPT2Config, ResNetConfig, TimmWrapperConfig
from transformers.testing_utils import CaptureLogger

import configuration_xraycap
from configuration_xraycap import XrayCapConfig


def test_presets_have_the_documented_sizes():
    assert XrayCapConfig.PRESETS == ("tiny", "resnet50-gpt2")
    real = XrayCapConfig.from_preset("resnet50-gpt2")
    assert isinstance(real.vision_config, ResNetConfig) and isinstance(real.text_config, GPT2Config)
    assert real.vision_config.depths == [3, 4, 6, 3] and real.vision_config.hidden_sizes[-1] == 2048
    assert (real.text_config.n_layer, real.text_config.n_embd, real.image_size) == (12, 768, 224)
    tiny = XrayCapConfig.from_preset("tiny")
    assert tiny.vision_config.hidden_sizes == [32, 64, 128, 256] and tiny.vision_config.depths == [1, 1, 1, 1]
    assert (tiny.text_config.n_layer, tiny.text_config.n_embd, tiny.image_size) == (3, 192, 128)
    assert tiny.visual_tokens == "grid" and not hasattr(tiny, "freeze_vision_encoder")


def test_overrides_reach_the_right_sub_config():
    config = XrayCapConfig.from_preset(
        "tiny",
        vocab_size=321,
        n_layer=2,
        max_views=1,
        pad_token_id=5,
        bos_token_id=3,
        eos_token_id=3,
        vision_config={"depths": [2, 1, 1, 1]},
    )
    assert config.vocab_size == config.text_config.vocab_size == 321
    assert config.text_config.n_layer == 2 and config.max_views == 1
    assert config.vision_config.depths == [2, 1, 1, 1] and config.vision_config.hidden_sizes[0] == 32
    assert (config.text_config.pad_token_id, config.text_config.bos_token_id) == (5, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"visual_tokens": "patches"}, r"'visual_tokens' expected one of \('pooled', 'grid'\), got patches"),
        ({"projection": "conv"}, r"'projection' expected one of \('linear', 'mlp'\), got conv"),
        ({"max_views": 3}, r"max_views=3: use 1 \(frontal\) or 2"),
        ({"grid_size": 0}, r"grid_size=0: use a positive number"),
        ({"image_size": 16}, r"image_size=16 px is too small: use at least 32"),
        ({"image_size": "224"}, r"'image_size' expected int"),
        ({"vision_config": {"model_type": "bert"}}, r"model_type 'bert' is not supported: use one of"),
    ],
)
def test_bad_fields_raise_naming_the_value_and_the_fix(kwargs, message):
    with pytest.raises(StrictDataclassError, match=message):
        XrayCapConfig.from_preset("tiny", **kwargs)
    with pytest.raises(ValueError, match="Unknown preset"):
        XrayCapConfig.from_preset("huge")


def test_saving_validates_a_config_changed_after_construction(tmp_path):
    config = XrayCapConfig.from_preset("tiny")
    config.max_views = 4  # validators run at save time too
    with pytest.raises(StrictDataclassError, match="max_views=4"):
        config.save_pretrained(tmp_path)


def test_old_config_with_freeze_vision_encoder_loads_and_says_it_is_ignored(tmp_path):
    config = XrayCapConfig.from_preset("tiny", vocab_size=300)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "freeze_vision_encoder": True}))
    with CaptureLogger(configuration_xraycap.logger) as captured:
        loaded = XrayCapConfig.from_pretrained(tmp_path)
    assert "freeze_vision_encoder=True: ignored" in captured.out
    assert not hasattr(loaded, "freeze_vision_encoder") and "freeze_vision_encoder" not in loaded.to_dict()
    assert loaded.text_config.vocab_size == 300


def test_save_load_round_trip_and_auto_config(tmp_path):
    config = XrayCapConfig.from_preset("tiny", vocab_size=300, visual_tokens="pooled", projection="mlp")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "xraycap" and saved["auto_map"]["AutoConfig"].endswith("XrayCapConfig")
    loaded = XrayCapConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    auto = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert auto.visual_tokens == "pooled" and auto.text_config.vocab_size == 300


def test_timm_vision_config_is_accepted():
    vision = TimmWrapperConfig(architecture="resnet18", num_classes=0)
    config = XrayCapConfig.from_preset("tiny", vision_config=vision)
    assert isinstance(config.vision_config, TimmWrapperConfig)
    again = XrayCapConfig.from_dict(config.to_dict())
    assert isinstance(again.vision_config, TimmWrapperConfig)
