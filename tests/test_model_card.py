"""The model card's per-observation table: each CheXpert observation with test support, test beside both floors."""

from pathlib import Path

from huggingface_hub import ModelCard

from xraycap.training.model_card import build_model_card, observation_table

RUN_INFO = {
    "model_name": "xraycap-test",
    "dataset_id": "synthetic-phantom-cxr",
    "dataset_name": "Synthetic phantom chest X-rays",
    "base_model": [],
    "architecture": "a ResNet -> linear projection -> grid visual tokens -> a GPT-2",
    "data_description": "40 synthetic studies.",
    "num_examples": {"train": 28, "validation": 4, "test": 8},
    "section": "findings",
    "views": "frontal",
    "num_beams": 2,
    "training_description": "AdamW, 8 steps.",
}


def test_card_shows_each_observation_beside_both_floors(tmp_path: Path):
    results = {
        "test": {
            "ce_macro_f1": 0.9,
            "ce_f1_cardiomegaly": 0.95,
            "ce_support_cardiomegaly": 12.0,
            "ce_f1_fracture": 0.8,
            "ce_support_fracture": 7.0,
            "ce_f1_edema": 0.0,
            "ce_support_edema": 0.0,  # no positive reference: not a row (ce_macro_f1 does not average it)
        },
        "test_image_ablated": {"ce_macro_f1": 0.1, "ce_f1_cardiomegaly": 0.2, "ce_f1_fracture": 0.0},
        "test_nearest_train": {"ce_macro_f1": 0.7, "ce_f1_cardiomegaly": 0.9},
    }
    build_model_card(results, RUN_INFO).save(tmp_path / "README.md")
    text = ModelCard.load(tmp_path / "README.md").text
    assert "| observation (F1) | test support | test | test_image_ablated | test_nearest_train |" in text
    assert "| Cardiomegaly | 12 | 0.950 | 0.200 | 0.900 |" in text
    assert "| Fracture | 7 | 0.800 | 0.000 | n/a |" in text
    assert "| Edema |" not in text
    assert observation_table({"test": {"ce_macro_f1": 0.5}}) == ""  # older results: no table


def test_model_card_round_trips_through_huggingface_hub(tmp_path: Path):
    """The card saves and loads with `ModelCard`: the test scores (numbers only) are its model-index; the body
    table has a column per split, with n/a for a missing value."""
    results = {
        "test": {"bleu_4": 0.125, "ce_macro_f1": 0.75, "meteor": None, "num_examples": 8},
        "test_image_ablated": {"bleu_4": 0.0625, "ce_macro_f1": 0.25},
    }
    build_model_card(results, {**RUN_INFO, "base_model": ["gpt2"]}).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "xraycap-test" and card.data.base_model == ["gpt2"]
    assert card.data.datasets is None  # phantoms are no Hub dataset; an Indiana run names the Kaggle copy
    indiana = build_model_card(results, {**RUN_INFO, "dataset_id": "raddar/chest-xrays-indiana-university"})
    assert indiana.data.datasets == ["raddar/chest-xrays-indiana-university"]
    assert {(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results} == {
        ("bleu_4", 0.125, "test"),
        ("ce_macro_f1", 0.75, "test"),
    }
    assert "| metric | test | test_image_ablated |" in card.text
    assert "| ce_macro_f1 | 0.750 | 0.250 |" in card.text and "| meteor | n/a | n/a |" in card.text
