"""A saved XrayCap folder through transformers' Auto classes, in a fresh process: `AutoModelForImageTextToText` and
`AutoModel` both give the generating model, `XrayCapModel` (the base model) loads the same folder, and a folder
saved by the code before the base model existed (its weight layout, its `freeze_vision_encoder` config field)
still loads with both Auto classes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testing_utils import REPO_ROOT, make_phantom_image, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# The last commit whose model was one class (a GPT2LMHeadModel inside, the vision parts at the top level).
ONE_CLASS_COMMIT = "3558ea0"
CODE_FILES = ("configuration_xraycap.py", "modeling_xraycap.py", "processing_xraycap.py")
MODEL_FILES = (
    "configuration_xraycap.py",
    "modeling_xraycap.py",
)  # what this change replaces in an old folder

# Run in a fresh process outside the repository: the folder's own code is what loads.
LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module
folder, images = sys.argv[1], json.loads(sys.argv[2])
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
batch = processor(images=images, return_tensors="pt")
ids = torch.tensor([[0, 5, 6, 7]]).repeat(len(batch["pixel_values"]), 1)
out = {}
for auto in (AutoModelForImageTextToText, AutoModel):
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    generated = model.generate(**batch, num_beams=2, max_new_tokens=6, eos_token_id=None)
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"], input_ids=ids).logits
    out[auto.__name__] = {"class": type(model).__name__, "module": type(model).__module__, "ids": generated.tolist(),
                          "logits": logits.flatten()[:50].tolist()}
base_class = get_class_from_dynamic_module("modeling_xraycap.XrayCapModel", folder)
base = base_class.from_pretrained(folder).eval()
with torch.no_grad():
    hidden = base(pixel_values=batch["pixel_values"], input_ids=ids)
out["base"] = {"shape": list(hidden.last_hidden_state.shape), "prefix_length": hidden.prefix_length}
print(json.dumps(out))
"""


def run_fresh(script: str, *args: str, cwd: Path, modules: Path) -> str:
    """Runs `script` in a new interpreter in `cwd`, without the repository on the path; returns its last line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def study_images(tmp_path: Path) -> list[str]:
    paths = [tmp_path / "frontal.png", tmp_path / "other.png"]
    for seed, path in enumerate(paths):
        make_phantom_image("cardiomegaly" if seed else "normal", size=64, seed=seed).save(path)
    return [str(p) for p in paths]


def test_both_auto_classes_and_the_base_model_load_a_saved_folder_in_a_fresh_process(tiny, tmp_path):
    model, processor = tiny
    images = study_images(tmp_path)
    batch = processor(images=images, return_tensors="pt")
    expected = model.generate(**batch, num_beams=2, max_new_tokens=6, eos_token_id=None).tolist()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    files = os.listdir(folder)
    assert {*CODE_FILES, "model.safetensors", "config.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForImageTextToText"]
    assert auto_map["AutoModel"] == "modeling_xraycap.XrayCapForConditionalGeneration"

    (outside := tmp_path / "elsewhere").mkdir()
    out = json.loads(
        run_fresh(LOAD_AND_GENERATE, str(folder), json.dumps(images), cwd=outside, modules=tmp_path / "m")
    )
    for auto in ("AutoModelForImageTextToText", "AutoModel"):
        assert out[auto]["class"] == "XrayCapForConditionalGeneration"
        assert out[auto]["module"].startswith("transformers_modules.")  # the folder's code, not the repo's
        assert out[auto]["ids"] == expected, auto
    with torch.no_grad():
        hidden = model.model(pixel_values=batch["pixel_values"], input_ids=torch.tensor([[0, 5, 6, 7]] * 2))
    assert out["base"] == {
        "shape": list(hidden.last_hidden_state.shape),
        "prefix_length": hidden.prefix_length,
    }
    assert hidden.prefix_length == model.max_prefix_length > 0


def test_saved_weights_keep_the_one_class_layout(tiny, tmp_path):
    """The weight file's names are those of the one-class model (`language_model` a GPT2LMHeadModel, the vision
    parts at the top): transformers maps them onto the two classes on load and back on save, so a folder written
    by this code also loads in code from before the base model."""
    model, _ = tiny
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert {"view_embedding", "language_model.transformer.wte.weight", "projection.norm.weight"} <= names
    assert all(
        n.startswith(("vision_model.", "projection.", "view_embedding", "language_model.")) for n in names
    )
    assert not [n for n in names if n.startswith(("model.", "lm_head."))]
    assert len(names) == len(model.state_dict()) - 1  # all but the LM head, tied to the token embeddings


@pytest.mark.slow
def test_a_folder_saved_before_the_base_model_loads_with_both_auto_classes(tmp_path):
    """A tiny model saved by the one-class code (its config has `freeze_vision_encoder`); the folder then gets
    today's code files and auto_map, as a user updating it would, and loads with both Auto classes and the same
    logits and reports."""
    old_code = tmp_path / "old_code"
    old_code.mkdir()
    for name in CODE_FILES:
        shown = subprocess.run(
            ["git", "show", f"{ONE_CLASS_COMMIT}:{name}"], cwd=REPO_ROOT, capture_output=True, text=True
        )
        if shown.returncode != 0:
            pytest.skip(f"git cannot show {ONE_CLASS_COMMIT}:{name} (no repository history here)")
        (old_code / name).write_text(shown.stdout)
    images = study_images(tmp_path)
    folder = tmp_path / "old_folder"
    make_tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    save_old = textwrap.dedent(
        """
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])  # the one-class code only
        from transformers import AutoTokenizer
        from configuration_xraycap import XrayCapConfig
        from modeling_xraycap import XrayCapForConditionalGeneration
        from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[3])
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        config = XrayCapConfig.from_preset("tiny", image_size=64, vocab_size=len(tokenizer), **ids)
        torch.manual_seed(0)
        model = XrayCapForConditionalGeneration(config).eval()
        with torch.no_grad():
            model.view_embedding.normal_(0.0, 0.5)  # weights that differ from any fresh init
        processor = XrayCapProcessor(XrayCapImageProcessor(size=64), tokenizer, max_views=2)
        XrayCapConfig.register_for_auto_class()
        model.register_for_auto_class("AutoModel")
        model.save_pretrained(sys.argv[2])
        processor.save_pretrained(sys.argv[2])
        batch = processor(images=json.loads(sys.argv[4]), return_tensors="pt")
        generated = model.generate(**batch, num_beams=2, max_new_tokens=6, eos_token_id=None)
        text = torch.tensor([[0, 5, 6, 7]]).repeat(len(batch["pixel_values"]), 1)
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], input_ids=text).logits
        print(json.dumps({"ids": generated.tolist(), "logits": logits.flatten()[:50].tolist()}))
        """
    )
    old = json.loads(
        run_fresh(
            save_old,
            *(str(old_code), str(folder), str(tmp_path / "tokenizer"), json.dumps(images)),
            cwd=tmp_path,
            modules=tmp_path / "m1",
        )
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["freeze_vision_encoder"] is True and "AutoModelForImageTextToText" not in config["auto_map"]

    for name in MODEL_FILES:  # today's model code, and the auto_map entry it writes
        shutil.copy(REPO_ROOT / name, folder / name)
    config["auto_map"]["AutoModelForImageTextToText"] = config["auto_map"]["AutoModel"]
    (folder / "config.json").write_text(json.dumps(config))
    (outside := tmp_path / "elsewhere").mkdir()
    out = json.loads(
        run_fresh(LOAD_AND_GENERATE, str(folder), json.dumps(images), cwd=outside, modules=tmp_path / "m2")
    )
    for auto in ("AutoModelForImageTextToText", "AutoModel"):
        assert out[auto]["class"] == "XrayCapForConditionalGeneration"
        torch.testing.assert_close(torch.tensor(out[auto]["logits"]), torch.tensor(old["logits"]))
        assert out[auto]["ids"] == old["ids"], auto
