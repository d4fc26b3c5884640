"""XrayCapProcessor / XrayCapImageProcessor / load_image / train_tokenizer."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from testing_utils import PHANTOM_REPORTS, make_phantom_image, make_tiny_tokenizer
from transformers import AutoProcessor

from processing_xraycap import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    XrayCapImageProcessor,
    XrayCapProcessor,
    load_image,
    train_tokenizer,
)


@pytest.fixture()
def processor():
    return XrayCapProcessor(XrayCapImageProcessor(size=64), make_tiny_tokenizer(), max_views=2)


def test_train_tokenizer_special_tokens_and_round_trip():
    texts = list(PHANTOM_REPORTS.values())
    tok = train_tokenizer(texts, vocab_size=300)
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]
    assert tok.bos_token_id == tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert 258 <= len(tok) <= 300
    for text in texts + ["Unseen wörds: 42%!"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_text_inputs_are_bos_report_eos_with_masked_labels(processor):
    texts = ["The heart is enlarged.", "Heart size is normal. No pneumothorax or pleural effusion."]
    batch = processor(text=texts, return_tensors="pt")
    tok = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    for row, text in enumerate(texts):
        body = tok(text, add_special_tokens=False)["input_ids"]
        n = len(body) + 2
        assert ids[row, :n].tolist() == [tok.bos_token_id, *body, tok.eos_token_id]
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[row, n:] == tok.pad_token_id).all() and tok.pad_token_id != tok.eos_token_id
        assert labels[row, 0] == -100 and labels[row, 1:n].tolist() == ids[row, 1:n].tolist()
        assert (labels[row, n:] == -100).all()
    assert processor.batch_decode(ids) == texts


def test_images_single_and_multi_view_with_view_mask(processor):
    a, b = make_phantom_image("normal", size=80), make_phantom_image("nodule", size=80)
    batch = processor(images=[a, [a, b]], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 2, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["view_mask"].tolist() == [[1, 0], [1, 1]]
    assert (batch["pixel_values"][0, 1] == 0).all()
    torch.testing.assert_close(batch["pixel_values"][0, 0], batch["pixel_values"][1, 0])
    single = processor(images=a, return_tensors="pt")
    assert single["pixel_values"].shape == (1, 2, 3, 64, 64)
    one_view = XrayCapProcessor(processor.image_processor, processor.tokenizer, max_views=1)
    natural = one_view(images=[a, b], return_tensors="pt")
    assert natural["pixel_values"].shape == (2, 3, 64, 64) and natural["view_mask"].tolist() == [[1], [1]]
    with pytest.raises(ValueError, match="max_views"):
        processor(images=[[a, b, a]])
    with pytest.raises(ValueError, match="one report per study"):
        processor(images=[a, b], text=["only one"])


def test_image_modes_become_normalised_rgb():
    image_processor = XrayCapImageProcessor(size=32)
    # Full 0-255 range, so the 16-bit copies (rescaled from their own min-max) match the 8-bit one.
    gray = ImageOps.autocontrast(make_phantom_image("cardiomegaly", size=48))
    expected = image_processor(gray)["pixel_values"][0]
    assert expected.shape == (3, 32, 32)
    # All three channels carry the same grey values, normalised with ImageNet statistics.
    raw = (expected * torch.tensor(IMAGENET_STD)[:, None, None]) + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    variants = {
        "RGB": gray.convert("RGB"),
        "RGBA": gray.convert("RGBA"),
        "P": gray.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=256),
        "I;16": Image.fromarray(np.asarray(gray).astype(np.uint16) * 257),
        "uint16 array": np.asarray(gray).astype(np.uint16) * 257,
        "uint8 array": np.asarray(gray),
        "float array": np.asarray(gray).astype(np.float32) / 255.0,
    }
    for name, image in variants.items():
        out = image_processor(image)["pixel_values"][0]
        assert out.shape == (3, 32, 32), name
        assert (out - expected).abs().mean() < 0.05, name


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "report.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="report.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "ok.png"
    make_phantom_image("normal", size=40).save(good)
    assert load_image(str(good)).mode == "RGB"


def test_long_text_is_truncated_with_warning(processor, caplog):
    long_text = " ".join(["No pleural effusion."] * 50)
    with caplog.at_level("WARNING"):
        batch = processor(text=[long_text, "Short."], max_length=20, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 20
    assert batch["input_ids"][0, -1] == processor.tokenizer.eos_token_id
    assert "truncated" in caplog.text


def test_processor_save_and_auto_load(processor, tmp_path, caplog):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "XrayCapProcessor" and loaded.max_views == 2
    image = make_phantom_image("nodule", size=64)
    a = processor(images=[image], text=["Right upper lobe nodule."])
    b = loaded(images=[image], text=["Right upper lobe nodule."])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    direct = XrayCapProcessor.from_pretrained(tmp_path)  # no trust_remote_code needed with the class itself
    assert direct.image_processor.crop_size.height == 64 and len(direct.tokenizer) == len(processor.tokenizer)
    overridden = XrayCapProcessor.from_pretrained(tmp_path, max_views=1)  # a saved setting overridden
    assert overridden.max_views == 1
    # pipeline() passes the model's loading options on: dropped. Anything else unknown is ignored by name.
    with caplog.at_level("WARNING"):
        loaded = XrayCapProcessor.from_pretrained(tmp_path, dtype=torch.float32, max_view=1)
    assert loaded.max_views == 2 and "ignores ['max_view']" in caplog.text
