"""Backbones: transformers ResNet, ConvNeXt, ViT, DeiT and Swin towers and timm CNNs / ViTs, with pooled and grid
tokens, and GPT-2-family decoders (distilgpt2, gpt2-medium; tiny random configs of their architecture). Each is built
from a local random-weight folder through `model_from_pretrained_towers`, trained a few steps, saved, and reloaded with
`trust_remote_code` (the folder's own copy of the code)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from testing_utils import FINDINGS, SMALL_RUN, make_phantom_image, make_tiny_tokenizer, reset_accelerate_state
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    BertConfig,
    BertModel,
    ConvNextConfig,
    ConvNextV2Config,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    GPT2Config,
    GPT2LMHeadModel,
    ResNetConfig,
    SwinConfig,
    TimmWrapperConfig,
    ViTConfig,
)

from configuration_xraycap import XrayCapConfig, fixed_input_size
from modeling_xraycap import XrayCapForConditionalGeneration, XrayCapModel
from processing_xraycap import IMAGENET_MEAN, XrayCapProcessor
from xraycap.training.models import freeze_vision_tower, model_from_pretrained_towers

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # px: every tower below takes it; the ViTs' position embeddings are sized for it
_VIT_NO_MLP = {"patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
_VIT = {**_VIT_NO_MLP, "intermediate_size": 64}
_CNN = {"hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
_SWIN = {
    "image_size": SIZE,
    "patch_size": 4,
    "embed_dim": 8,
    "window_size": 2,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
}
_TIMM_VIT = {"img_size": SIZE, "depth": 1, "embed_dim": 32, "num_heads": 2}
_TIMM_SWIN = {
    "img_size": SIZE,
    "embed_dim": 8,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 2, 2),
    "window_size": 2,
}

# Tiny vision towers by kind: (config factory, side of the native map / patch grid at 64 px, tokens before the patches).
VISION_TOWERS = {
    "resnet": (lambda: ResNetConfig(embedding_size=8, layer_type="basic", **_CNN), 2, 0),
    "convnext": (lambda: ConvNextConfig(**_CNN), 2, 0),
    "vit": (lambda: ViTConfig(image_size=SIZE, **_VIT), 4, 1),  # class token
    "deit": (lambda: DeiTConfig(image_size=SIZE, **_VIT), 4, 2),  # class + distillation tokens
    "swin": (lambda: SwinConfig(**_SWIN), 2, 0),
    "timm-convnext": (lambda: TimmWrapperConfig(architecture="test_convnext"), 2, 0),
    "timm-vit": (lambda: TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=_TIMM_VIT), 4, 1),
}
# Layout-only towers (no folder round trip): the same rules, more architectures.
MORE_TOWERS = {
    "convnextv2": (lambda: ConvNextV2Config(**_CNN), 2, 0),
    "dinov2": (lambda: Dinov2Config(image_size=SIZE, mlp_ratio=2, **_VIT_NO_MLP), 4, 1),
    "dinov2-registers": (
        lambda: Dinov2WithRegistersConfig(image_size=SIZE, mlp_ratio=2, num_register_tokens=2, **_VIT_NO_MLP),
        4,
        3,
    ),
    "timm-resnet": (lambda: TimmWrapperConfig(architecture="test_resnet"), 2, 0),
    "timm-swin": (
        lambda: TimmWrapperConfig(architecture="swin_tiny_patch4_window7_224", model_args=_TIMM_SWIN),
        2,
        0,
    ),
}
FIXED_SIZE = ("vit", "deit", "timm-vit", "timm-swin")  # position embeddings / windows sized for 64 px

# Tiny stand-ins for the GPT-2 family, in its architecture: distilgpt2 is 6 layers x 768, gpt2-medium 24 x 1024.
GPT2_FAMILIES = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "distilgpt2": {"n_layer": 1, "n_embd": 64, "n_head": 2},
    "gpt2-medium": {"n_layer": 3, "n_embd": 96, "n_head": 4},
}


def save_vision_tower(kind: str, folder: Path, seed: int = 0) -> str:
    """A random-weight tower of `kind` saved as a pretrained checkpoint folder."""
    factory = {**VISION_TOWERS, **MORE_TOWERS}[kind][0]
    torch.manual_seed(seed)
    AutoModel.from_config(factory()).save_pretrained(folder)
    return str(folder)


def save_text_tower(folder: Path, family: str = "gpt2", n_positions: int = 128) -> str:
    """A random-weight GPT2LMHeadModel shaped like `family`, with a local tokenizer, saved as a checkpoint folder. Like
    the real checkpoints its config has no pad token and says "gelu_new"."""
    tokenizer = make_tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        activation_function="gelu_new",
        **GPT2_FAMILIES[family],
    )
    torch.manual_seed(1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory) -> str:
    return save_text_tower(tmp_path_factory.mktemp("gpt2"))


def towers_model(
    vision: str, text: str, freeze_vision_encoder: bool = True, **config_kwargs
) -> tuple[XrayCapForConditionalGeneration, XrayCapProcessor]:
    """`model_from_pretrained_towers` and its processor, paired as run_captioning pairs them (the tokenizer's special
    ids), the vision tower frozen unless told otherwise, as run_captioning does with --vision_model."""
    processor = XrayCapProcessor.from_tokenizer(text, image_size=SIZE, max_views=2, vision_model=vision)
    tok = processor.tokenizer
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    model = model_from_pretrained_towers(vision, text, **ids, **config_kwargs)
    freeze_vision_tower(model, freeze_vision_encoder)
    return model, processor


def study_batch(processor: XrayCapProcessor):
    """Two studies (one with a lateral, one without) and their reports."""
    images = [
        [make_phantom_image(FINDINGS[0]), make_phantom_image(FINDINGS[1], seed=1)],
        [make_phantom_image()],
    ]
    return processor(
        images=images, text=["Heart size is normal.", "The heart is enlarged."], return_tensors="pt"
    )


def train_save_reload(model, batch, folder: Path, steps: int = 3) -> list[float]:
    """A few AdamW steps on `batch`, then save and reload with trust_remote_code: same logits, same greedy reports."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    images = {"pixel_values": batch["pixel_values"], "view_mask": batch["view_mask"]}
    ids = model.generate(**images, max_new_tokens=4, eos_token_id=None)
    model.save_pretrained(folder)
    assert {"configuration_xraycap.py", "modeling_xraycap.py", "model.safetensors"} <= set(os.listdir(folder))
    reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules."), type(
        reloaded
    ).__module__  # saved code
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)
    assert torch.equal(reloaded.generate(**images, max_new_tokens=4, eos_token_id=None), ids)
    return losses


# ----------------------------------------------------------------------------------------- vision towers


@pytest.mark.parametrize("visual_tokens", ["pooled", "grid"])
@pytest.mark.parametrize("kind", list(VISION_TOWERS))
def test_vision_tower_from_a_local_folder_trains_saves_and_reloads(kind, visual_tokens, text_tower, tmp_path):
    vision = save_vision_tower(kind, tmp_path / kind)
    model, processor = towers_model(
        vision,
        text_tower,
        visual_tokens=visual_tokens,
        grid_size=2,
        image_size=SIZE,
        freeze_vision_encoder=False,
    )
    tower = AutoModel.from_pretrained(vision)
    for name, value in tower.state_dict().items():  # the checkpoint's weights, all of them
        assert torch.equal(model.vision_model.state_dict()[name], value), name
    before = {name: p.detach().clone() for name, p in model.vision_model.named_parameters()}
    batch = study_batch(processor)
    tokens = 1 if visual_tokens == "pooled" else 4  # 2x2: a 2x2 map as it is, a 4x4 patch grid pooled
    assert model.tokens_per_view == tokens and model.max_prefix_length == 2 * tokens  # before any forward
    features = model.get_image_features(batch["pixel_values"], batch["view_mask"])
    assert features.shape == (2, 2, tokens, model.vision_feature_dim)

    losses = train_save_reload(model, batch, tmp_path / f"xraycap-{kind}-{visual_tokens}")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    changed = [n for n, p in model.vision_model.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # the unfrozen tower trained too


def _tower_model(kind: str, image_size: int = SIZE, **overrides) -> XrayCapForConditionalGeneration:
    factory = {**VISION_TOWERS, **MORE_TOWERS}[kind][0]
    config = XrayCapConfig.from_preset(
        "tiny", vision_config=factory().to_dict(), image_size=image_size, max_views=1, n_layer=1, **overrides
    )
    torch.manual_seed(0)
    return XrayCapForConditionalGeneration(config).eval()


@pytest.mark.parametrize("kind", [*VISION_TOWERS, *MORE_TOWERS])
def test_tokens_per_view_is_known_without_a_forward(kind):
    """The native map / patch grid (class, distillation and register tokens dropped) at 64 px and, for towers that take
    any size, at 96 px and at 80 px (transformers towers: padded CNNs and Swin round up, patchify stems round down; timm
    CNNs are exact at multiples of their 32x reduction): counted from the config / the timm module, then checked
    against a forward."""
    side, _ = {**VISION_TOWERS, **MORE_TOWERS}[kind][1:]
    sizes = [SIZE] if kind in FIXED_SIZE else [SIZE, 96] if kind.startswith("timm") else [SIZE, 96, 80]
    for size in sizes:
        model = _tower_model(kind, size, grid_size=None)
        if size == SIZE:
            assert model.tokens_per_view == side * side, kind
        features = model.get_image_features(torch.randn(1, 3, size, size))
        assert features.shape[2:] == (model.tokens_per_view, model.vision_feature_dim), (kind, size)


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2-registers", "timm-vit", "swin", "convnext"])
def test_class_tokens_are_handled(kind):
    """Pooled: the class token where the tower has one, else its pooled output. Grid: the patch tokens only, in their
    square map, average-pooled to grid_size like a CNN map."""
    _, side, prefix = {**VISION_TOWERS, **MORE_TOWERS}[kind]
    pixels = torch.randn(2, 3, SIZE, SIZE)
    pooled = _tower_model(kind, visual_tokens="pooled")
    with torch.no_grad():
        outputs = pooled.vision_model(pixel_values=pixels)
    hidden = outputs.last_hidden_state
    expected = hidden[:, 0] if prefix else outputs.pooler_output.reshape(2, -1)
    torch.testing.assert_close(pooled.get_image_features(pixels)[:, 0, 0], expected)
    grid = _tower_model(kind, visual_tokens="grid", grid_size=2)
    grid.load_state_dict(pooled.state_dict())
    cells = hidden[:, prefix:].transpose(1, 2) if hidden.ndim == 3 else hidden.flatten(2)
    cells = cells.reshape(2, -1, side, side)
    expected = torch.nn.functional.adaptive_avg_pool2d(cells, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(grid.get_image_features(pixels)[:, 0], expected)


def test_real_size_layouts_and_widths_are_read_without_compute():
    """ViT-B/16 and DeiT-B at 224 px: a 14x14 patch grid; Swin-T and ConvNeXt-T downsample 32x: 7x7. Widths: the last
    stage's (ConvNeXt hidden_sizes[-1]; Swin hidden_size) or the ViT width. The model reads them from its built tower
    on the meta device (as `from_pretrained` builds it): no weights, no compute."""
    expected = [
        (ViTConfig(), (14, 1), 768),
        (DeiTConfig(), (14, 2), 768),
        (SwinConfig(), (7, 0), 768),
        (ConvNextConfig(), (7, 0), 768),
        (ResNetConfig(hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck"), (7, 0), 2048),
    ]
    for vision, (side, prefix), width in expected:
        config = XrayCapConfig(vision_config=vision.to_dict(), image_size=224)
        with torch.device("meta"):
            model = XrayCapModel(config)
        assert (model._grid_side, model._prefix_tokens, model.vision_feature_dim) == (side, prefix, width)


def test_image_size_follows_a_tower_with_fixed_position_embeddings(text_tower, tmp_path):
    """A ViT (transformers or timm) takes one image size: model_from_pretrained_towers defaults to it, and another is refused
    naming both sizes and the fix. A CNN takes any size (default 224)."""
    for kind, name in (("vit", "ViTModel"), ("timm-vit", "TimmWrapperModel")):
        vision = save_vision_tower(kind, tmp_path / kind)
        model = model_from_pretrained_towers(vision, text_tower, max_views=1)
        assert model.config.image_size == SIZE
        with pytest.raises(
            ValueError, match=rf"image_size=96, but the vision tower \({name}\) takes only 64-px"
        ):
            model_from_pretrained_towers(vision, text_tower, image_size=96)
    with pytest.raises(ValueError, match="use image_size=64"):
        XrayCapForConditionalGeneration(
            XrayCapConfig(vision_config=ViTConfig(image_size=SIZE, **_VIT).to_dict())
        )
    resnet = save_vision_tower("resnet", tmp_path / "resnet")
    model = model_from_pretrained_towers(resnet, text_tower, max_views=1)
    assert model.config.image_size == 224
    # A timm checkpoint's config says so too (pretrained_cfg), before any model is built (run_captioning reads it).
    timm_config = TimmWrapperConfig(architecture="test_vit", pretrained_cfg={"input_size": [3, 96, 96]})
    assert fixed_input_size(timm_config) is None
    timm_config.pretrained_cfg["fixed_input_size"] = True
    assert fixed_input_size(timm_config) == 96


def test_processor_takes_the_vision_towers_normalisation(text_tower, tmp_path):
    """preprocessor_config.json's image_mean/std (ViTs: 0.5), else a timm config's pretrained_cfg mean/std, else
    ImageNet's; the saved processor keeps them."""
    vit = save_vision_tower("vit", tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        )
    )
    timm = save_vision_tower("timm-convnext", tmp_path / "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    config["pretrained_cfg"] = {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    resnet = save_vision_tower("resnet", tmp_path / "resnet")
    for vision, mean, std in (
        (vit, [0.5] * 3, [0.5] * 3),
        (timm, [0.4] * 3, [0.2] * 3),
        (resnet, IMAGENET_MEAN, None),
    ):
        processor = XrayCapProcessor.from_tokenizer(text_tower, image_size=SIZE, vision_model=vision)
        assert (
            list(processor.image_processor.image_mean) == mean
            and processor.image_processor.crop_size.height == SIZE
        )
        if std is not None:
            assert list(processor.image_processor.image_std) == std
    processor = XrayCapProcessor.from_tokenizer(text_tower, image_size=SIZE, vision_model=vit)
    grey = make_phantom_image(size=SIZE).convert("RGB")
    pixels = processor(images=[grey])["pixel_values"][0, 0]
    expected = torch.from_numpy(np.asarray(grey, dtype=np.float32)[..., 0]) / 255 * 2 - 1
    torch.testing.assert_close(pixels[0], expected)  # (x - 0.5) / 0.5
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert (
        list(reloaded.image_processor.image_mean) == [0.5] * 3
        and list(reloaded.image_processor.image_std) == [0.5] * 3
    )


# ----------------------------------------------------------------------------------------- text towers


@pytest.mark.parametrize("family", ["distilgpt2", "gpt2-medium"])
def test_gpt2_family_text_tower_trains_saves_and_reloads(family, tmp_path):
    """A GPT-2-family decoder (tiny, in the family's architecture) is loaded whole (depth, width, weights) with its
    tokenizer's special ids, and the projection maps into its width."""
    text = save_text_tower(tmp_path / family, family)
    vision = save_vision_tower("resnet", tmp_path / "resnet")
    model, processor = towers_model(vision, text, image_size=SIZE)
    gpt2 = GPT2LMHeadModel.from_pretrained(text).eval()
    text_config, shape = model.config.text_config, GPT2_FAMILIES[family]
    assert (text_config.n_layer, text_config.n_embd) == (shape["n_layer"], shape["n_embd"])
    assert model.projection.proj.out_features == shape["n_embd"]
    assert model.config.vocab_size == len(processor.tokenizer) == gpt2.config.vocab_size
    assert model.config.pad_token_id == processor.tokenizer.pad_token_id != model.config.eos_token_id
    ids = torch.randint(2, gpt2.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, gpt2(input_ids=ids).logits)
    losses = train_save_reload(model, study_batch(processor), tmp_path / f"xraycap-{family}")
    assert losses[-1] < losses[0], losses


def test_a_tower_of_another_kind_is_refused_naming_it(text_tower, tmp_path):
    """A BERT folder as the text tower, or a BERT (no vision tower) as the vision tower: refused before any weights
    are loaded, naming the model_type and the fix."""
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(bert)
    resnet = save_vision_tower("resnet", tmp_path / "resnet")
    with pytest.raises(
        ValueError, match=r"Text tower model_type 'bert' is not GPT-2.*distilgpt2, gpt2-medium"
    ):
        model_from_pretrained_towers(resnet, str(bert))
    with pytest.raises(
        ValueError, match=r"Vision tower model_type 'bert' is not supported: use one of \('resnet'"
    ):
        model_from_pretrained_towers(str(bert), text_tower)
    with pytest.raises(StrictDataclassError, match="Text tower model_type 'bert'"):
        XrayCapConfig(text_config=AutoConfig.from_pretrained(bert).to_dict())


# ----------------------------------------------------------------------------------------- run_captioning


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xraycap-cache")


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_run_captioning_with_pretrained_towers(kind, run_cache, tmp_path, monkeypatch):
    """`--vision_model <folder> --text_model <folder>`: a few steps, then the saved folder loads with trust_remote_code,
    with the ViT's own image size (no --image_size given) and its normalisation, and writes reports."""
    import run_captioning

    vision = save_vision_tower(kind, tmp_path / kind)
    if kind == "vit":
        (tmp_path / kind / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
        )
    text = save_text_tower(tmp_path / "gpt2", n_positions=256)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    reset_accelerate_state()
    try:
        run_captioning.main(
            [
                *SMALL_RUN,
                "--max_steps",
                "2",
                "--do_eval",
                "false",
                "--vision_model",
                vision,
                "--text_model",
                text,
                "--output_dir",
                str(out),
                "--cache_dir",
                str(run_cache),
            ]
        )
    finally:
        reset_accelerate_state()
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert model.config.vision_config.model_type == kind and type(model).__module__.startswith(
        "transformers_modules."
    )
    assert model.config.image_size == (
        SIZE if kind == "vit" else 128
    )  # the ViT's own; the preset's for a CNN
    assert processor.image_processor.crop_size.height == model.config.image_size
    assert list(processor.image_processor.image_mean) == ([0.5] * 3 if kind == "vit" else IMAGENET_MEAN)
    for name, value in (
        AutoModel.from_pretrained(vision).state_dict().items()
    ):  # frozen: the checkpoint's weights
        assert torch.equal(model.vision_model.state_dict()[name], value), name
    batch = processor(images=[make_phantom_image(size=96)], return_tensors="pt")
    ids = model.generate(**batch, max_new_tokens=4, eos_token_id=None)
    assert ids.shape == (1, 4)


def test_run_captioning_config_and_processor_follow_the_vision_tower(tmp_path, monkeypatch):
    """Without --image_size a ViT's own size is used; with a locally trained tokenizer (no --text_model) the processor
    still takes the tower's normalisation."""
    import run_captioning
    from xraycap.training.models import build_config, build_processor

    vit = save_vision_tower("vit", tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    monkeypatch.chdir(tmp_path)
    model_args, _, _ = run_captioning.parse_args(["--vision_model", vit])
    config = build_config(model_args)
    assert config.image_size == SIZE
    processor = build_processor(model_args, config, ["Heart size is normal. No pleural effusion."] * 20)
    assert processor.image_processor.crop_size.height == SIZE
    assert list(processor.image_processor.image_mean) == [0.5] * 3
    model_args, _, _ = run_captioning.parse_args(["--vision_model", vit, "--image_size", "96"])
    assert build_config(model_args).image_size == 96  # asked for: kept (the model then refuses it, naming 64)
