"""XrayCapModel / XrayCapForConditionalGeneration: forward and loss, parity with GPT-2, save/load (the Auto
classes, folders saved before the base model existed), freezing as training does it, errors."""

import time

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from testing_utils import (
    FINDINGS,
    PHANTOM_REPORTS,
    make_phantom_image,
    make_tiny_model_and_processor,
    make_tiny_tokenizer,
    phantom_batch,
)
from transformers import GPT2LMHeadModel, ResNetConfig, ResNetModel, TimmWrapperConfig

from configuration_xraycap import XrayCapConfig
from modeling_xraycap import XrayCapForConditionalGeneration
from xraycap.training.models import freeze_vision_tower, model_from_pretrained_towers

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- forward


def test_forward_returns_loss_and_logits_over_prefix_and_text(tiny):
    model, processor = tiny
    batch = phantom_batch(processor)
    out = model(**batch)
    prefix = model.config.max_views * 4  # 64 px -> 2x2 grid per view
    assert out.prefix_length == prefix
    assert out.logits.shape == (2, prefix + batch["input_ids"].shape[1], model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # The loss covers only the report tokens: recompute it by hand from the text logits.
    logits = out.logits[:, prefix - 1 : -1]
    manual = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual)


def test_logits_to_keep_with_labels_gives_the_same_loss(tiny):
    """The training forward (training.optimization.training_loss) computes logits on the report positions only."""
    model, processor = tiny
    batch = phantom_batch(processor)
    full = model(**batch)
    keep = batch["input_ids"].shape[1] + 1  # the report positions and the last prefix position
    kept = model(**batch, logits_to_keep=keep)
    assert kept.logits.shape == (2, keep, model.config.vocab_size)
    torch.testing.assert_close(kept.logits, full.logits[:, -keep:])
    torch.testing.assert_close(kept.loss, full.loss)


def test_grid_size_pools_the_feature_map():
    """grid_size average-pools the encoder's map: 4x4 at 128 px -> 2x2 tokens per view."""
    native, _ = make_tiny_model_and_processor(max_views=1, grid_size=None)
    pooled, _ = make_tiny_model_and_processor(max_views=1, grid_size=2)
    pooled.load_state_dict(native.state_dict())
    assert (native.tokens_per_view, pooled.tokens_per_view) == (16, 4)  # before any forward
    pixels = torch.randn(2, 3, 128, 128)
    full = native.eval().get_image_features(pixels)[:, 0]  # (2, 16, 256)
    grid = full.transpose(1, 2).reshape(2, 256, 4, 4)
    expected = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled.eval().get_image_features(pixels)[:, 0], expected)
    assert pooled.tokens_per_view == 4 and pooled.max_prefix_length == 4
    # A map already no larger than grid_size is left as it is.
    wide, _ = make_tiny_model_and_processor(max_views=1, grid_size=8)
    wide.load_state_dict(native.state_dict())
    torch.testing.assert_close(wide.eval().get_image_features(pixels)[:, 0], full)
    assert wide.tokens_per_view == 16
    with pytest.raises(StrictDataclassError, match="grid_size=0"):
        XrayCapConfig.from_preset("tiny", grid_size=0)


def test_image_features_and_layouts_are_interchangeable(tiny):
    model, processor = tiny
    batch = phantom_batch(processor)
    features = model.get_image_features(batch["pixel_values"], batch["view_mask"])
    assert features.shape == (2, 2, 4, 256) and not features.requires_grad
    assert (features[:, 1] == 0).all()  # absent views are not encoded
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = model(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"], **text).logits
    via_features = model(image_features=features, view_mask=batch["view_mask"], **text).logits
    torch.testing.assert_close(via_features, ref)
    # Without view_mask the zero padding (processor / get_image_features) is recognised as absent views.
    torch.testing.assert_close(model(pixel_values=batch["pixel_values"], **text).logits, ref)
    torch.testing.assert_close(model(image_features=features, **text).logits, ref)
    # A study with its second view masked reads exactly like the same study given as one view, (B, 3, H, W).
    one_view = model(pixel_values=batch["pixel_values"][:, 0], **text)
    torch.testing.assert_close(one_view.logits[:, 4:], ref[:, 8:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "visual_tokens, projection, tokens", [("pooled", "mlp", 1), ("grid", "mlp", 4), ("pooled", "linear", 1)]
)
def test_token_modes_and_projections(visual_tokens, projection, tokens):
    model, processor = make_tiny_model_and_processor(
        image_size=64, visual_tokens=visual_tokens, projection=projection, max_views=1
    )
    model.eval()
    batch = phantom_batch(processor)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    out = model(**batch)
    assert out.prefix_length == tokens == model.tokens_per_view and torch.isfinite(out.loss)
    assert model.get_image_features(batch["pixel_values"]).shape == (2, 1, tokens, 256)
    assert model.generate(pixel_values=batch["pixel_values"], max_new_tokens=3, eos_token_id=None).shape == (
        2,
        3,
    )


def test_view_embedding_distinguishes_slots(tiny):
    model, processor = tiny
    batch = phantom_batch(processor, text=False)
    frontal = batch["pixel_values"][:, :1]
    as_second = torch.cat([torch.zeros_like(frontal), frontal], dim=1)
    prefix_a, _ = model.model.get_prefix_embeds(model.get_image_features(frontal))
    view_mask = torch.tensor([[0, 1]] * 2)
    prefix_b, mask_b = model.model.get_prefix_embeds(
        model.get_image_features(as_second, view_mask), view_mask
    )
    assert mask_b[:, :4].sum() == 0 and mask_b[:, 4:].all()
    diff = prefix_b[:, 4:] - prefix_a
    torch.testing.assert_close(diff, (model.view_embedding[1] - model.view_embedding[0]).expand_as(diff))


def test_text_path_matches_gpt2(tiny):
    """Without an image prefix the logits are those of GPT2LMHeadModel with the same weights."""
    model, processor = tiny
    gpt2 = GPT2LMHeadModel(model.config.text_config).eval()
    gpt2.transformer.load_state_dict(model.language_model.state_dict())
    ids = processor(text=[PHANTOM_REPORTS["nodule"]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = gpt2(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, expected)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_decoder_is_gpt2_fed_the_prefix_and_text_embeddings(tiny, mode):
    """Logits and loss equal a plain GPT2LMHeadModel with the same weights, fed the same inputs_embeds (image
    prefix + text embeddings), mask, positions and labels; in train mode with the same dropout draws too."""
    model, processor = tiny
    batch = phantom_batch(processor)  # one view per study: the second view slot is masked out
    gpt2 = GPT2LMHeadModel(model.config.text_config)
    gpt2.transformer.load_state_dict(model.language_model.state_dict())
    prefix, prefix_mask = model.model.get_prefix_embeds(model.get_image_features(batch["pixel_values"]))
    text = model.get_input_embeddings()(batch["input_ids"])
    mask = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)
    labels = torch.cat([torch.full(prefix_mask.shape, -100), batch["labels"]], dim=1)
    model.train(mode == "train")
    gpt2.train(mode == "train")
    try:
        torch.manual_seed(0)
        ours = model(**batch)
        torch.manual_seed(0)
        reference = gpt2(
            inputs_embeds=torch.cat([prefix, text], dim=1),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            labels=labels,
        )
    finally:
        model.eval()
    torch.testing.assert_close(ours.logits, reference.logits, atol=0, rtol=0)
    torch.testing.assert_close(ours.loss, reference.loss, atol=0, rtol=0)


def test_bf16_autocast_over_fp32_weights_with_channels_last():
    """Under bf16 autocast the decoder computes in bf16 over fp32 weights, the loss matches fp32 to bf16
    precision, gradients reach fp32 weights (the encoder's channels_last convolutions included), and
    generation runs."""
    model, processor = make_tiny_model_and_processor(image_size=64, freeze_vision_encoder=False)
    model = model.to(memory_format=torch.channels_last).eval()  # eval: no dropout, so the losses compare
    batch = phantom_batch(processor)
    fp32_loss = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.float(), fp32_loss, rtol=2e-2, atol=0)
    out.loss.backward()
    conv = model.vision_model.embedder.embedder.convolution.weight
    assert conv.dtype == torch.float32 and conv.grad is not None and conv.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = model.generate(**batch, max_new_tokens=3, eos_token_id=None)
    assert ids.shape == (2, 3) and int(ids.max()) < model.config.vocab_size


def test_attention_weights_come_back_when_asked():
    """With eager attention, `output_attentions=True` returns one map per layer over prefix + text, from the base
    model and the head (the app's heat maps read them)."""
    model, processor = make_tiny_model_and_processor(image_size=64, attn_implementation="eager")
    batch = phantom_batch(processor)
    with torch.no_grad():
        base = model.eval().model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], output_attentions=True
        )
        head = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], output_attentions=True)
    length = base.prefix_length + batch["input_ids"].shape[1]
    for out in (base, head):
        assert len(out.attentions) == model.config.text_config.n_layer
        assert out.attentions[0].shape[-2:] == (length, length)


def test_a_training_forward_builds_no_cache_unless_asked(tiny):
    """In train mode with labels the decoder fills no KV cache (nothing reads it); eval and an explicit
    `use_cache=True` keep transformers' default."""
    model, processor = tiny
    batch = phantom_batch(processor)
    was_training = model.training
    try:
        model.train()
        assert model(**batch).cache is None
        assert model(**batch, use_cache=True).cache is not None
        model.eval()
        with torch.no_grad():
            assert model(**batch).cache is not None
    finally:
        model.train(was_training)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Checkpointing replays the RNG, so the recomputed forward draws the dropout masks it drew the first time."""
    model, processor = make_tiny_model_and_processor(image_size=64)
    batch = phantom_batch(processor)
    model.train()

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(3)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert torch.equal(loss, checkpointed_loss)
    torch.testing.assert_close(checkpointed_grads, grads, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- save / load


def test_save_load_in_process_keeps_weights(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    loaded = XrayCapForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert loaded.generation_config.pad_token_id == model.config.pad_token_id
    # Freezing is the training code's choice, not the folder's: a loaded model trains whole until frozen.
    assert all(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert loaded.vision_model.training


def test_model_from_pretrained_towers_accepts_local_folders(tmp_path):
    vision = ResNetModel(
        ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], layer_type="basic"
        )
    )
    tok = make_tiny_tokenizer()
    text_config = XrayCapConfig.from_preset("tiny", vocab_size=len(tok) - 1, n_layer=1).text_config
    text_config.pad_token_id = None  # a GPT-2 without pad, like the real one
    text_config.activation_function = "gelu_new"  # as GPT-2 checkpoints say
    text = GPT2LMHeadModel(text_config)
    vision.save_pretrained(tmp_path / "resnet")
    text.save_pretrained(tmp_path / "gpt2")
    model = model_from_pretrained_towers(
        str(tmp_path / "resnet"), str(tmp_path / "gpt2"), image_size=64, max_views=1
    )
    assert torch.equal(
        model.vision_model.embedder.embedder.convolution.weight, vision.embedder.embedder.convolution.weight
    )
    assert torch.equal(model.language_model.h[0].attn.c_attn.weight, text.transformer.h[0].attn.c_attn.weight)
    old_vocab = text_config.vocab_size
    assert model.config.pad_token_id == old_vocab and model.config.vocab_size == old_vocab + 1
    assert torch.equal(model.get_input_embeddings().weight[:old_vocab], text.transformer.wte.weight)
    # "gelu_new" becomes its fused twin "gelu_pytorch_tanh": the same function, one kernel.
    assert model.config.text_config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(0, old_vocab, (1, 12))
    with torch.no_grad():
        expected = text.eval()(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits[..., :old_vocab]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ids = model.eval().generate(pixel_values=torch.randn(1, 3, 64, 64), max_new_tokens=3, eos_token_id=None)
    assert ids.shape == (1, 3)
    # A pad id given explicitly (the tokenizer's, from XrayCapProcessor.from_tokenizer) also grows the vocabulary.
    again = model_from_pretrained_towers(
        str(tmp_path / "resnet"), str(tmp_path / "gpt2"), image_size=64, pad_token_id=old_vocab
    )
    assert again.config.vocab_size == old_vocab + 1


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_timm_vision_tower(architecture):
    vision = TimmWrapperConfig(architecture=architecture, num_classes=0)
    model, processor = make_tiny_model_and_processor(vision_config=vision, image_size=64, max_views=1)
    model.eval()
    batch = phantom_batch(processor, text=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    features = model.get_image_features(batch["pixel_values"])
    assert features.shape[-1] == model.vision_feature_dim == model.vision_model.timm_model.num_features
    assert model.generate(pixel_values=batch["pixel_values"], max_new_tokens=3).shape[0] == 2


# ----------------------------------------------------------------------------------------- freezing


def _step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    out = model(**batch)
    out.loss.backward()
    optimizer.step()


def test_frozen_encoder_is_bit_identical_after_a_step():
    """A frozen encoder gets no gradient and keeps its weights and BatchNorm statistics after a training step,
    while the projection, the view embeddings and GPT-2 move."""
    model, processor = make_tiny_model_and_processor(image_size=64)
    batch = phantom_batch(processor)
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if "vision_model." not in k}
    _step(model, batch)
    assert model.training and not model.vision_model.training
    assert all(p.grad is None and not p.requires_grad for p in model.vision_model.parameters())
    for name, value in model.vision_model.state_dict().items():
        assert torch.equal(value, vision_before[name]), name  # includes running_mean / running_var
    after = model.state_dict()
    for prefix in ("model.projection.", "model.view_embedding", "model.language_model."):
        changed = [
            k for k in rest_before if k.startswith(prefix) and not torch.equal(after[k], rest_before[k])
        ]
        assert changed, prefix


def test_image_features_carry_grad_exactly_when_a_tower_parameter_requires_it():
    """The tower runs without grad when none of its parameters requires grad (what makes its features cacheable),
    read from the parameters themselves: no setting can disagree with them."""
    model, processor = make_tiny_model_and_processor(image_size=64, freeze_vision_encoder=False)
    pixels = phantom_batch(processor, text=False)["pixel_values"]
    assert model.get_image_features(pixels).requires_grad
    freeze_vision_tower(model)
    assert not model.get_image_features(pixels).requires_grad
    model.vision_model.requires_grad_(True)  # trainable again, behind freeze_vision_tower's back
    assert model.get_image_features(pixels).requires_grad


def test_a_frozen_tower_stays_in_eval_mode_through_train_and_eval_switches():
    """Training freezes the tower once; every later `model.train()` (the training loop, evaluation handing the
    mode back) leaves it in eval mode, so its BatchNorm statistics never move. Unfreezing hands it back."""
    model, _ = make_tiny_model_and_processor(image_size=64)  # frozen, as training freezes it
    for mode in (True, False, True):
        model.train(mode)
        assert model.training is mode and model.language_model.training is mode
        assert not model.vision_model.training and not any(m.training for m in model.vision_model.modules())
    freeze_vision_tower(model, frozen=False)
    assert model.vision_model.training and all(p.requires_grad for p in model.vision_model.parameters())
    model.eval()
    assert not model.vision_model.training


def test_unfrozen_encoder_trains():
    """An unfrozen encoder gets gradients and its weights move."""
    model, processor = make_tiny_model_and_processor(image_size=64, freeze_vision_encoder=False)
    batch = phantom_batch(processor)
    conv = model.vision_model.embedder.embedder.convolution.weight
    bn = model.vision_model.embedder.embedder.normalization
    conv_before, mean_before = conv.detach().clone(), bn.running_mean.clone()
    _step(model, batch)
    assert model.vision_model.training and conv.grad is not None
    assert not torch.equal(conv, conv_before) and not torch.equal(bn.running_mean, mean_before)
    # Freezing later restores eval mode and stops gradients.
    freeze_vision_tower(model)
    model.train()
    assert not model.vision_model.training and not conv.requires_grad


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 64, 64), "expected \\(batch, 3, height, width\\)"),
        ((2, 1, 64, 64), "3 colour channels"),
        ((2, 3, 3, 64, 64), "max_views=2"),
        ((2, 1, 2, 3, 64, 64), "expected"),
    ],
)
def test_error_on_bad_pixel_values(tiny, shape, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        model(pixel_values=torch.zeros(shape), input_ids=torch.zeros(shape[0], 3, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        model.generate(pixel_values=torch.zeros(shape), max_new_tokens=2)


def test_error_on_bad_view_mask_and_batch_mismatch(tiny):
    model, processor = tiny
    batch = phantom_batch(processor)
    with pytest.raises(ValueError, match="view_mask has shape"):
        model(pixel_values=batch["pixel_values"], view_mask=torch.ones(2, 3), input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="no view"):
        model(pixel_values=batch["pixel_values"], view_mask=torch.zeros(2, 2), input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="one report per study"):
        model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:1])
    with pytest.raises(ValueError, match="either pixel_values or image_features"):
        model(pixel_values=batch["pixel_values"], image_features=torch.zeros(2, 2, 4, 256))


def test_error_on_attention_mask_of_another_length(tiny):
    """A mask must cover the text, or the image prefix + text (as `generate` passes it)."""
    model, processor = tiny
    batch = phantom_batch(processor)
    with pytest.raises(ValueError, match="attention_mask has"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, :-1]})
    prefix_mask = torch.ones(2, model.max_prefix_length, dtype=torch.long)
    prefix_mask[:, model.tokens_per_view :] = 0  # the second view slot is empty
    full = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)
    torch.testing.assert_close(model(**{**batch, "attention_mask": full}).logits, model(**batch).logits)


def test_error_on_text_longer_than_positions(tiny):
    """The model raises (the processor truncates with a warning, see test_processing_xraycap)."""
    model, processor = tiny
    batch = phantom_batch(processor, findings=FINDINGS[:1], text=False)
    n_positions = model.config.text_config.n_positions
    ids = torch.ones(1, n_positions, dtype=torch.long)
    with pytest.raises(ValueError, match=f"exceeds the decoder's n_positions={n_positions}"):
        model(**batch, input_ids=ids)
    fits = torch.ones(1, n_positions - model.max_prefix_length, dtype=torch.long)
    assert model(**batch, input_ids=fits).logits.shape[1] == n_positions
    long_text = " ".join(["No pleural effusion."] * 200)
    encoded = processor(images=[make_phantom_image("normal", size=64)], text=[long_text])
    assert model(**encoded).logits.shape[1] <= n_positions


# ----------------------------------------------------------------------------------------- real size


def test_real_size_preset_builds_runs_and_counts():
    """The resnet50-gpt2 preset has ResNet-50's and GPT-2 small's parameter counts, a 32-token prefix for two
    views, and generates."""
    start = time.perf_counter()
    config = XrayCapConfig.from_preset("resnet50-gpt2")
    model = XrayCapForConditionalGeneration(config).eval()
    vision = sum(p.numel() for p in model.vision_model.parameters())
    text = sum(p.numel() for p in model.language_model.parameters())
    glue = sum(p.numel() for p in model.projection.parameters()) + model.view_embedding.numel()
    print(
        f"resnet50-gpt2 parameters: ResNet-50 {vision / 1e6:.2f}M, GPT-2 {text / 1e6:.2f}M, "
        f"projection+views {glue / 1e6:.2f}M, total {(vision + text + glue) / 1e6:.2f}M"
    )
    assert 23.0e6 < vision < 24.0e6
    assert 124.0e6 < text < 125.0e6
    pixel_values = torch.randn(1, 2, 3, 224, 224)
    ids = torch.tensor([[config.bos_token_id, 464, 2612, 318]])
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=ids, labels=ids)
    # 2 views x the 7x7 map pooled to 4x4 (grid_size=None keeps 2 x 49 = 98).
    assert out.prefix_length == 32 and out.logits.shape == (1, 32 + 4, 50258) and torch.isfinite(out.loss)
    native = XrayCapForConditionalGeneration(XrayCapConfig.from_preset("resnet50-gpt2", grid_size=None))
    assert native.max_prefix_length == 98
    generated = model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=4, eos_token_id=None)
    assert generated.shape == (1, 4)
    print(f"resnet50-gpt2 build + forward + 3-beam generate: {time.perf_counter() - start:.1f}s")
