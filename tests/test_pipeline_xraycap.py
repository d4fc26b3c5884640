"""The shipped pipeline (`pipeline_xraycap.py`): `pipeline("image-to-text", model=dir, trust_remote_code=True)`, what it loads and what it returns."""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import pipeline
from usage_testing_utils import phantom_studies

from modeling_xraycap import XrayCapForConditionalGeneration
from pipeline_xraycap import CUSTOM_PIPELINES, XrayCapImageToTextPipeline, add_pipeline_to_folder

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")


# --------------------------------------------------------------------------------------------------
# The transformers pipeline route: `pipeline("image-to-text", model=dir, trust_remote_code=True)`.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(model_dir):
    return pipeline("image-to-text", model=str(model_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def studies():
    return phantom_studies(3, 128, start=200)


def _reference(loaded, images, **generate_kwargs):
    model, processor = loaded
    with torch.no_grad():
        ids = model.generate(**processor(images=images, return_tensors="pt"), **generate_kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_saved_folder_declares_the_pipeline(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert (model_dir / "pipeline_xraycap.py").is_file()


def test_pipeline_class_and_single_image(captioner, loaded, studies):
    assert type(captioner).__name__ == "XrayCapImageToTextPipeline"
    frontal = studies[0][0]
    out = captioner(frontal)
    expected = _reference(loaded, [frontal])
    assert out == [{"generated_text": expected[0]}]
    assert len(expected[0]) > 0  # the tiny model's generation config guarantees real text


def test_pipeline_text_depends_on_the_image(captioner, studies):
    texts = {captioner(frontal)[0]["generated_text"] for frontal, _, _ in studies}
    assert len(texts) > 1


def test_generate_kwargs_pass_through(captioner, loaded, studies):
    frontal, lateral, _ = studies[1]
    for kwargs in ({"num_beams": 3}, {"max_new_tokens": 9}, {"num_beams": 2, "max_new_tokens": 10}):
        assert captioner(frontal, **kwargs)[0]["generated_text"] == _reference(loaded, [frontal], **kwargs)[0]
    # generate_kwargs={...} is the same as keywords
    assert captioner(frontal, generate_kwargs={"max_new_tokens": 9}) == captioner(frontal, max_new_tokens=9)
    # max_new_tokens really reaches generate: fewer tokens, a prefix of the longer greedy text
    model, processor = loaded
    short = captioner(frontal, max_new_tokens=9)[0]["generated_text"]
    assert len(processor.tokenizer(short)["input_ids"]) <= 9
    # several sequences per image
    out = captioner(frontal, num_beams=3, num_return_sequences=3)
    assert out == [
        {"generated_text": t} for t in _reference(loaded, [frontal], num_beams=3, num_return_sequences=3)
    ]


def test_frontal_lateral_pair(captioner, loaded, studies):
    frontal, lateral, _ = studies[2]
    expected = _reference(loaded, [[frontal, lateral]])[0]
    assert captioner({"frontal": frontal, "lateral": lateral})[0]["generated_text"] == expected
    assert captioner((frontal, lateral))[0]["generated_text"] == expected
    assert expected != _reference(loaded, [[frontal]])[0]  # the lateral view is used


def test_batched_list_of_inputs(captioner, loaded, studies, tmp_path):
    frontal_path = tmp_path / "frontal.png"
    studies[0][0].save(frontal_path)
    inputs = [str(frontal_path), studies[1][0], {"frontal": studies[2][0], "lateral": studies[2][1]}]
    outputs = captioner(inputs, batch_size=2, num_beams=2)
    assert len(outputs) == 3
    expected = _reference(loaded, [[studies[0][0]], [studies[1][0]]], num_beams=2) + _reference(
        loaded, [[studies[2][0], studies[2][1]]], num_beams=2
    )
    assert [o[0]["generated_text"] for o in outputs] == expected


def test_task_inferred_from_the_folder(model_dir, studies):
    # With one custom pipeline in config.json the task may be left out.
    inferred = pipeline(model=str(model_dir), trust_remote_code=True)
    assert type(inferred).__name__ == "XrayCapImageToTextPipeline"
    assert inferred(studies[0][0], max_new_tokens=8)[0]["generated_text"]


def test_add_pipeline_to_folder_needs_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        add_pipeline_to_folder(tmp_path)


def test_image_text_to_text_task_writes_the_folders_report(model_dir, studies):
    # The model is registered for AutoModelForImageTextToText, so transformers' built-in task (where plain
    # "image-to-text" is redirected when a folder declares no custom pipeline) loads it and writes the same
    # report as the folder's own pipeline, from an empty prompt.
    builtin = pipeline("image-text-to-text", model=str(model_dir), trust_remote_code=True)
    ours = pipeline(model=str(model_dir), trust_remote_code=True)
    image = studies[0][0]
    expected = ours(image, max_new_tokens=8)[0]["generated_text"]
    assert builtin(images=image, text="", max_new_tokens=8)[0]["generated_text"].strip() == expected.strip()


# --------------------------------------------------------------------------------------------------
# The pipeline loads only what its caller allowed and never waits forever on a URL.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def processor_loads(monkeypatch, loaded):
    """Record AutoProcessor.from_pretrained's arguments; hand back the real processor."""
    calls = []

    def from_pretrained(source, *args, **kwargs):
        calls.append(kwargs)
        return loaded[1]

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", from_pretrained)
    return calls


def test_processor_fallback_uses_the_callers_trust_and_revision(model_dir, processor_loads):
    """A model object built from the local class: its processor is not loaded with remote code unasked."""
    model = XrayCapForConditionalGeneration.from_pretrained(model_dir).eval()
    XrayCapImageToTextPipeline(model=model)
    XrayCapImageToTextPipeline(model=model, revision="0123abc")
    XrayCapImageToTextPipeline(model=model, trust_remote_code=True)
    assert [(c["trust_remote_code"], c["revision"]) for c in processor_loads] == [
        (False, None),
        (False, "0123abc"),
        (True, None),
    ]


def test_url_images_are_fetched_with_a_timeout_and_read_like_files(model_dir, loaded, monkeypatch):
    frontal = phantom_studies(1, 128, start=300)[0][0]
    sixteen = Image.fromarray(np.asarray(frontal, dtype=np.uint16) * 180 + 500)  # a 16-bit film
    encoded = io.BytesIO()
    sixteen.save(encoded, format="PNG")
    fetched = []

    class Response(io.BytesIO):
        pass

    def urlopen(url, timeout=None):
        fetched.append((url, timeout))
        return Response(encoded.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    captioner = pipeline("image-to-text", model=str(model_dir), trust_remote_code=True)
    url = "https://example.invalid/film.png"
    assert captioner(url) == captioner(sixteen)
    assert fetched[0][0] == url and isinstance(fetched[0][1], float) and 0 < fetched[0][1] <= 120
    captioner(url, timeout=2.5)
    assert fetched[-1][1] == 2.5
