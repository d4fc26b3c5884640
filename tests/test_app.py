"""The demo serves only the model the user named, takes uploads as they come and says what the model
knows. No browser: the Blocks' components are driven directly."""

import shutil

import numpy as np
import pytest
import transformers
from gradio.data_classes import ImageData
from PIL import Image
from usage_testing_utils import phantom_studies, write_model_card

import app
from processing_xraycap import XrayCapImageProcessor
from xraycap.training.model_card import SYNTHETIC_DATASET


def _component(demo, elem_id):
    found = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id]
    return found[0] if found else None


def test_16bit_upload_reaches_the_processor_as_uploaded(model_dir, tmp_path):
    """Gradio must not convert an upload to 8-bit RGB (it clips a 16-bit film to near-white)."""
    frontal = phantom_studies(1, 128, start=400)[0][0]
    film = tmp_path / "film.png"
    Image.fromarray(np.asarray(frontal, dtype=np.uint16) * 180 + 500).save(film)  # 500..46400
    demo = app.build_demo(str(model_dir))
    processor = XrayCapImageProcessor(size=64)
    for elem_id in ("frontal", "lateral"):
        received = _component(demo, elem_id).preprocess(ImageData(path=str(film), orig_name="film.png"))
        pixels = [processor(image)["pixel_values"] for image in (received, film)]
        assert pixels[0].equal(pixels[1]), elem_id


def test_app_serves_only_the_model_the_user_named(tmp_path, monkeypatch):
    calls = []

    def from_pretrained(source, *args, **kwargs):
        calls.append((str(source), kwargs))
        raise OSError("not loaded in this test")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match="outputs/xraycap-iu"):
        app.Captioner("outputs/xraycap-iu").load()
    with pytest.raises(ValueError, match="--trust_remote_code"):
        app.Captioner("someone/xraycap-iu").load()
    assert calls == []

    monkeypatch.setenv("XRAYCAP_MODEL", "someone/xraycap-iu")
    monkeypatch.setenv("XRAYCAP_TRUST_REMOTE_CODE", "1")
    monkeypatch.setenv("XRAYCAP_REVISION", "0123abc")
    options = app.resolve_model_options([])
    assert options == app.ModelOptions("someone/xraycap-iu", True, "0123abc")
    captioner = app.Captioner(options.model, trust_remote_code=True, revision=options.revision)
    with pytest.raises(OSError):
        captioner.load()
    assert calls[0][0] == "someone/xraycap-iu"
    assert calls[0][1]["trust_remote_code"] is True and calls[0][1]["revision"] == "0123abc"
    cli = app.resolve_model_options(["--model", "a/b", "--revision", "fe12"])
    assert cli.model == "a/b" and cli.revision == "fe12"


def test_launch_caps_the_upload_size(monkeypatch):
    demo = app.build_demo("outputs/no-such-model")
    seen = {}
    monkeypatch.setattr(demo, "launch", lambda **kwargs: seen.update(kwargs))
    app.launch(demo, "127.0.0.1", 7999)
    assert seen["max_file_size"] == app.MAX_FILE_SIZE and seen["server_port"] == 7999


@pytest.mark.parametrize("phantom", [True, False])
def test_phantom_trained_model_shows_a_warning_beside_the_report(model_dir, tmp_path, phantom):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if phantom:
        write_model_card(folder, SYNTHETIC_DATASET, "24 synthetic phantom chest radiograph studies.")
    else:
        write_model_card(folder, "raddar/chest-xrays-indiana-university", "Indiana University chest X-rays.")
    note = _component(app.build_demo(str(folder)), "training-data-warning")
    if phantom:
        assert note is not None and note.visible and "synthetic phantom" in note.value
    else:
        assert note is None
