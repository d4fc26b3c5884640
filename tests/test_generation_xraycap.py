"""XrayCapForConditionalGeneration.generate: new tokens only, the KV cache, batching, beams, reading the image."""

import time

import pytest
import torch
from testing_utils import (
    FINDINGS,
    PHANTOM_REPORTS,
    make_phantom_image,
    make_tiny_model_and_processor,
    phantom_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFIT_FINDINGS = FINDINGS[:4]  # normal, cardiomegaly, left effusion, right pneumothorax


def _strip(ids: torch.Tensor, eos: int) -> list[list[int]]:
    """Generated rows up to and including the first eos (the rest is padding)."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.fixture(scope="module")
def overfit():
    """A tiny model trained to memorise 4 (phantom image, report) pairs; ~10-20 s on one busy core."""
    model, processor = make_tiny_model_and_processor(
        image_size=64, max_views=1, text_config={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    )
    batch = phantom_batch(processor, OVERFIT_FINDINGS)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    features = model.get_image_features(batch["pixel_values"], batch["view_mask"])  # frozen: compute once
    start, losses = time.perf_counter(), []
    for _ in range(400):
        out = model(
            image_features=features,
            view_mask=batch["view_mask"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if losses[-1] < 0.005:
            break
    print(
        f"overfit: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.4f}, {time.perf_counter() - start:.1f}s"
    )
    return model.eval(), processor, batch


# ----------------------------------------------------------------------------------------- generation


def test_generate_returns_new_tokens_only(tiny):
    model, processor = tiny
    batch = phantom_batch(processor, text=False)
    ids = model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert ids.shape == (2, 5) and ids.dtype == torch.long
    ids = model.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=2, eos_token_id=None)
    assert ids.shape == (4, 4)
    torch.manual_seed(0)
    sampled = model.generate(**batch, do_sample=True, top_p=0.9, max_new_tokens=6, no_repeat_ngram_size=2)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 6
    # max_length counts the bos prompt, as for any decoder-only model; the image prefix is not counted.
    assert model.generate(**batch, max_length=6, eos_token_id=None).shape == (2, 5)
    out = model.generate(
        **batch, max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True, output_scores=True
    )
    assert out.sequences.shape == (2, 5) and len(out.scores) == 5


def test_static_cache_generates_what_the_dynamic_cache_does(overfit):
    """`cache_implementation="static"` (the cache compiled decoding uses) is sized for the image prefix too."""
    model, _, batch = overfit
    for kwargs in ({"do_sample": False}, {"num_beams": 3}):
        kwargs |= {"pixel_values": batch["pixel_values"], "max_new_tokens": 20}
        assert torch.equal(model.generate(**kwargs, cache_implementation="static"), model.generate(**kwargs))


def test_overfits_four_pairs_and_reads_the_image(overfit):
    """After overfitting four pairs, each report comes back exactly from its image; permuting the images permutes the reports."""
    model, processor, batch = overfit
    references = [PHANTOM_REPORTS[f] for f in OVERFIT_FINDINGS]
    ids = model.generate(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"], max_new_tokens=40)
    assert processor.batch_decode(ids) == references
    order = [2, 3, 1, 0]
    ids = model.generate(pixel_values=batch["pixel_values"][order], max_new_tokens=40, num_beams=3)
    assert processor.batch_decode(ids) == [references[i] for i in order]
    # Fresh images of the same findings (another noise/jitter seed) still map to the right reports.
    fresh = processor(images=[make_phantom_image(f, size=64, seed=7) for f in OVERFIT_FINDINGS])
    assert processor.batch_decode(model.generate(**fresh, max_new_tokens=40)) == references


def test_beam_search_with_cache_equals_without(overfit):
    """Beam search with the KV cache gives the same beams as re-reading the whole sequence every step."""
    model, _, batch = overfit
    kwargs = {"pixel_values": batch["pixel_values"], "num_beams": 3, "max_new_tokens": 30}
    lengths = {True: [], False: []}
    for use_cache in (True, False):
        hook = model.language_model.register_forward_pre_hook(
            lambda module, args, kw, use_cache=use_cache: lengths[use_cache].append(
                kw["inputs_embeds"].shape[1]
                if kw.get("inputs_embeds") is not None
                else kw["input_ids"].shape[1]
            ),
            with_kwargs=True,
        )
        try:
            out = model.generate(**kwargs, use_cache=use_cache)
        finally:
            hook.remove()
        if use_cache:
            cached = out
        else:
            uncached = out
    assert torch.equal(cached, uncached)
    # The cached run feeds one new token per step; the uncached one re-reads a sequence one token longer each step.
    assert set(lengths[True][1:]) == {1}
    assert lengths[False] == list(range(lengths[False][0], lengths[False][0] + len(lengths[False])))
    assert len(lengths[False]) > 5
    kwargs.update(num_return_sequences=3, no_repeat_ngram_size=3)
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))


def test_batched_generation_equals_one_by_one(overfit):
    """Greedy and beam search give each study the same report alone as in a batch."""
    model, _, batch = overfit
    eos = model.config.eos_token_id
    for kwargs in ({"do_sample": False}, {"num_beams": 3}):
        together = _strip(
            model.generate(pixel_values=batch["pixel_values"], max_new_tokens=30, **kwargs), eos
        )
        alone = [
            _strip(
                model.generate(pixel_values=batch["pixel_values"][i : i + 1], max_new_tokens=30, **kwargs),
                eos,
            )[0]
            for i in range(len(OVERFIT_FINDINGS))
        ]
        assert together == alone, kwargs


def test_batched_generation_with_missing_views_equals_one_by_one():
    """Studies with one and two views in one batch: the masked view changes nothing."""
    model, processor = make_tiny_model_and_processor(image_size=64, seed=3, initializer_range=0.5)
    model.eval()
    a, b, c = (make_phantom_image(f, size=64) for f in ("normal", "nodule", "cardiomegaly"))
    mixed = processor(images=[[a], [b, c], [c]])
    kwargs = {"max_new_tokens": 8, "eos_token_id": None}
    together = model.generate(**mixed, **kwargs)
    alone = [
        model.generate(pixel_values=processor(images=[a])["pixel_values"][:, :1], **kwargs),
        model.generate(**processor(images=[[b, c]]), **kwargs),
        model.generate(pixel_values=processor(images=[c])["pixel_values"][:, 0], **kwargs),
    ]
    assert together.tolist() == [row[0].tolist() for row in alone]


def test_greedy_equals_hand_written_loop(overfit):
    """generate(do_sample=False) == argmax decoding by full forward passes, no cache."""
    model, _, batch = overfit
    eos, bos = model.config.eos_token_id, model.config.bos_token_id
    pixel_values = batch["pixel_values"]
    generated = _strip(model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=40), eos)
    for i in range(pixel_values.shape[0]):
        tokens = [bos]
        with torch.no_grad():
            for _ in range(40):
                logits = model(pixel_values=pixel_values[i : i + 1], input_ids=torch.tensor([tokens])).logits
                tokens.append(int(logits[0, -1].argmax()))
                if tokens[-1] == eos:
                    break
        assert tokens[1:] == generated[i]


def test_max_new_tokens_is_capped_to_the_positions_left(tiny, caplog):
    model, processor = tiny
    batch = phantom_batch(processor, findings=FINDINGS[:1], text=False)
    with caplog.at_level("WARNING"):
        ids = model.generate(**batch, max_new_tokens=10_000, eos_token_id=None)
    room = model.config.text_config.n_positions - model.max_prefix_length - 1
    assert ids.shape[1] == room and "capping" in caplog.text
