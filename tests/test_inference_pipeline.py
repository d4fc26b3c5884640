"""The pipeline loads only what its caller allowed and never waits forever on a URL."""

import io
import urllib.request

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers import pipeline
from usage_testing_utils import phantom_studies

from modeling_xraycap import XrayCapForConditionalGeneration
from pipeline_xraycap import XrayCapImageToTextPipeline

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")


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
