"""The performance harness (benchmarks/run.py) on tiny sizes: every section runs, the JSON has the issue's
keys with medians and spreads, the table is printed, and the baselines compute what they stand for."""

import json
import sys

import pytest
import torch
from testing_utils import REPO_ROOT, make_tiny_model_and_processor

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import run_captioning  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.baselines import (  # noqa: E402
    SeedStyleCaptioner,
    generate_without_cache,
    seed_language_model,
)
from benchmarks.flops import compute_fraction_figures, matmul_rate  # noqa: E402
from benchmarks.sections import SMOKE, train_section  # noqa: E402
from benchmarks.timing import ratio_summary, summarize  # noqa: E402

TOP_LEVEL = (
    "train_speedup_vs_seed",
    "beam_speedup_vs_nocache",
    "data_speedup_vs_png",
    "build_rss_growth",
    "train_compute_fraction",
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops on shared cores: one thread avoids OpenMP barrier stalls; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_json_and_table(tmp_path, capsys):
    output = tmp_path / "latest.json"
    status = run.main(["--smoke", "--sections", "train,beam,data,build,gpu", "--output", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| Figure | xraycap | Baseline |")
    results = json.loads(output.read_text())
    for key in TOP_LEVEL:
        assert isinstance(results[key], float) and results[key] == results[key], key  # a number, not NaN
        assert results["targets"][key]["met"] in (True, False)
    assert list(results)[:5] == list(TOP_LEVEL)
    assert results["machine"]["versions"]["torch"] == torch.__version__
    train = results["sections"]["train"]
    for name in ("seed", "xraycap_cached_features", "xraycap_no_cache", "feature_encoding_per_batch"):
        figure = train["seconds_per_step"][name]
        assert figure["n"] == 2 and figure["min"] <= figure["median"] <= figure["max"], name
    assert train["flops_per_step"]["xraycap_cached_features"] > 0
    # The cached step skips the encoder: fewer FLOPs than the step that runs it.
    assert train["flops_per_step"]["xraycap_cached_features"] < train["flops_per_step"]["xraycap_no_cache"]
    assert 0 < results["train_compute_fraction"] < 1.5
    # The step trains in what run_captioning's `--mixed_precision auto` picks on this CPU.
    precision = "bf16" if run_captioning.cpu_has_bf16_matmuls() else "fp32"
    assert f"{precision}_reference" in train["matmul_flops_per_second"]
    assert ("bf16_small_matrices" in train["matmul_flops_per_second"]) is (precision == "fp32")
    beam = results["sections"]["beam"]
    assert beam["outputs_equal"] is True and beam["setup"]["new_tokens"] == 5
    build = results["sections"]["build"]
    assert [row["images"] for row in build["series"]] == [40, 80]
    assert all(row["peak_rss_mb"] > 10 and row["examples"] > 0 for row in build["series"])
    data = results["sections"]["data"]
    assert data["setup"]["images"] == 4 and data["speedup"]["n"] == 1
    if not torch.cuda.is_available():
        assert results["sections"]["gpu"] == {"skipped": "no CUDA device"}


def test_seed_baseline_adds_image_vector_to_every_token():
    model, _ = make_tiny_model_and_processor(max_views=1, visual_tokens="pooled")
    seed = SeedStyleCaptioner(model.vision_model, model.language_model, model.vision_feature_dim).eval()
    pixel_values = torch.randn(2, 1, 3, 64, 64)
    input_ids = torch.randint(2, 50, (2, 6))
    mask = torch.ones_like(input_ids)
    captured = {}
    hook = model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        out = seed(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask)
    hook.remove()
    # Same sequence length as the text (no prefix), and the same image vector on every position.
    assert out.logits.shape[1] == input_ids.shape[1]
    offset = captured["embeds"] - model.get_input_embeddings()(input_ids)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)
    assert not any(p.requires_grad for p in seed.encoder.parameters())


def test_seed_decoder_is_stock_gpt2_with_the_same_weights():
    """The seed loop's GPT-2 keeps GPT-2's own settings (unfused "gelu_new"), not xraycap's."""
    model, _ = make_tiny_model_and_processor()
    seed = seed_language_model(model.language_model).eval()
    assert model.config.text_config.activation_function == "gelu_pytorch_tanh"
    assert seed.config.activation_function == "gelu_new"
    ids = torch.randint(2, 50, (2, 10))
    with torch.no_grad():
        expected = model.language_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(seed(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_native_grid_variant_is_timed_when_the_preset_pools():
    """With a pooled grid (here 4x4 -> 2x2 per view) the same step is also timed on the native map."""
    model, _ = make_tiny_model_and_processor(grid_size=2)
    result = train_section(SMOKE, model=model)
    assert result["setup"]["image_prefix_tokens"] == 2 * 4 and result["setup"]["grid_size"] == 2
    native = result["native_grid"]
    assert native["image_prefix_tokens"] == 2 * 16 and native["seconds_per_step"]["n"] == SMOKE.repeats
    assert native["flops_per_step"] > result["flops_per_step"]["xraycap_cached_features"]


def test_master_weights_step_is_timed_against_fp32_weights():
    """Under bf16 on CPU the xraycap step is run_captioning's: bf16 weight matrices, fp32 master weights. The same
    step with fp32 weights under autocast (--master_weights off) is timed beside it, on a copy."""
    model, _ = make_tiny_model_and_processor()
    before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    result = train_section(SMOKE, model=model)
    assert "MasterWeightsAdamW (bf16 weights, fp32 master weights)" in result["setup"]["xraycap_side"]
    fp32_weights = result["fp32_weights"]
    assert fp32_weights["seconds_per_step"]["n"] == SMOKE.repeats
    assert fp32_weights["flops_per_step"] == result["flops_per_step"]["xraycap_cached_features"]
    assert 0 < fp32_weights["compute_fraction_headline"] <= fp32_weights["compute_fraction"]["max"]
    peak = result["matmul_flops_per_second"]["bf16_reference"]
    assert peak == result["matmul_flops_per_second"]["bf16_highest_reading"]
    assert fp32_weights["compute_fraction_fastest_step_at_machine_rate"]["matmul_flops_per_second"] == peak
    trained = [p for p in model.language_model.parameters() if p.requires_grad]
    assert {p.dtype for p in trained if p.ndim >= 2} == {torch.bfloat16}
    assert {p.dtype for p in trained if p.ndim < 2} == {torch.float32}
    changed = [
        k for k, v in model.language_model.state_dict().items() if not torch.equal(v.float(), before[k])
    ]
    assert changed, "the model was not trained"

    fp32_model, _ = make_tiny_model_and_processor()
    assert "fp32_weights" not in train_section(SMOKE, model=fp32_model, amp_dtype=None)
    assert all(p.dtype == torch.float32 for p in fp32_model.parameters())


def test_no_cache_baseline_rereads_the_whole_sequence_and_matches():
    model, _ = make_tiny_model_and_processor(max_views=1)
    model.eval()
    lengths = []
    hook = model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: lengths.append(
            (kwargs["inputs_embeds"].shape[1], kwargs.get("cache") is None)
        ),
        with_kwargs=True,
    )
    kwargs = {"pixel_values": torch.randn(2, 1, 3, 128, 128), "num_beams": 2, "max_new_tokens": 6}
    cached = model.generate(min_new_tokens=6, **kwargs)
    prefix = model.max_prefix_length + 1  # image tokens + bos
    assert lengths == [(prefix, False)] + [(1, False)] * 5
    lengths.clear()
    uncached = generate_without_cache(model, min_new_tokens=6, **kwargs)
    assert lengths == [(prefix + step, True) for step in range(6)]  # the whole sequence, every step
    assert torch.equal(cached, uncached)
    # The model is left as it was: the cache is used again afterwards.
    lengths.clear()
    model.generate(min_new_tokens=2, **kwargs)
    assert lengths[1] == (1, False)
    hook.remove()


def test_compute_fraction_headline_is_the_lowest_of_three_estimates():
    """A run loaded throughout (every bracketing rate low) is held to the highest rate it read anywhere."""
    figures = compute_fraction_figures(100.0, [1.0, 2.0, 1.0], [50.0, 40.0, 100.0], peak_rate=100.0)
    assert figures["compute_fraction"]["median"] == 1.25  # 100/1/50 = 2, 100/2/40 = 1.25, 100/1/100 = 1
    assert figures["compute_fraction_least_loaded_repeat"]["fraction"] == 1.0
    assert figures["compute_fraction_headline"] == 1.0
    loaded = compute_fraction_figures(100.0, [1.0, 1.0], [40.0, 50.0], peak_rate=200.0)
    assert loaded["compute_fraction_least_loaded_repeat"]["fraction"] == 2.0
    assert loaded["compute_fraction_fastest_step_at_machine_rate"]["fraction"] == 0.5
    assert loaded["compute_fraction_headline"] == 0.5


def test_an_earlier_runs_rate_on_the_same_machine_is_carried_as_the_reference(tmp_path):
    """The matmul rate a run is held to carries over from the results it overwrites, on the same machine only."""
    machine = {"cpu": "Xeon", "cpu_count": 2, "torch_threads": 2, "cpu_capability": "AVX512", "cuda": None}
    earlier = tmp_path / "latest.json"
    rates = {
        "bf16": {"max": 1.5e12},
        "bf16_highest_reading": 1.6e12,
        "bf16_reference": 1.9e12,
        "matrix_side": 4096,
    }
    earlier.write_text(
        json.dumps({"machine": machine, "sections": {"train": {"matmul_flops_per_second": rates}}})
    )
    assert run.previous_reference_rate(earlier, machine, 4096) == 1.9e12
    assert run.previous_reference_rate(earlier, machine, 4096, torch.float32) is None  # a bf16 run's only
    fp32_run = {"fp32": {"max": 1.3e11}, "fp32_reference": 1.4e11, "matrix_side": 4096}
    (tmp_path / "fp32.json").write_text(
        json.dumps({"machine": machine, "sections": {"train": {"matmul_flops_per_second": fp32_run}}})
    )
    assert run.previous_reference_rate(tmp_path / "fp32.json", machine, 4096, torch.float32) == 1.4e11
    assert run.previous_reference_rate(earlier, machine, 256) is None  # another matrix size
    assert run.previous_reference_rate(earlier, {**machine, "cpu_count": 4}, 4096) is None
    assert run.previous_reference_rate(tmp_path / "missing.json", machine, 4096) is None
    old_schema = {"bf16": {"max": 1.5e12}, "matrix_side": 4096}  # a run from before the reference was kept
    earlier.write_text(
        json.dumps({"machine": machine, "sections": {"train": {"matmul_flops_per_second": old_schema}}})
    )
    assert run.previous_reference_rate(earlier, machine, 4096) == 1.5e12
    # A reference above every reading of the section is what the fastest step is held to.
    model, _ = make_tiny_model_and_processor()
    result = train_section(SMOKE, model=model, reference_rate=1e18)
    assert result["matmul_flops_per_second"]["bf16_reference"] == 1e18
    assert result["compute_fraction_fastest_step_at_machine_rate"]["matmul_flops_per_second"] == 1e18
    assert (
        result["compute_fraction_headline"]
        == result["compute_fraction_fastest_step_at_machine_rate"]["fraction"]
    )


def test_summaries():
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["spread"] == pytest.approx(1.0)
    assert ratio_summary([4.0, 9.0], [2.0, 3.0])["values"] == [2.0, 3.0]
    with pytest.raises(ValueError, match="pair"):
        ratio_summary([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        summarize([])


def test_bf16_hardware_check_agrees_with_a_measured_matmul():
    """run_captioning's check (what `--mixed_precision auto` follows on CPU) says what a timing shows: without
    bf16 matmul hardware a bf16 matmul is far slower than fp32 (torch's scalar fallback)."""
    slowdown = matmul_rate(torch.float32, 256)[0] / matmul_rate(torch.bfloat16, 256)[0]
    assert (slowdown < 10) is run_captioning.cpu_has_bf16_matmuls(), slowdown
