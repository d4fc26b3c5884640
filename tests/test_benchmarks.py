"""The benchmark harness (benchmarks/run.py) at toy sizes: every CPU section runs and reports its figure, and each
baseline computes what it stands for."""

import json
import math
import sys

import pytest
import torch
from testing_utils import REPO_ROOT, make_tiny_model_and_processor
from transformers import GPT2Config

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.baselines import SeedCaptioner  # noqa: E402
from benchmarks.inputs import random_batch  # noqa: E402
from benchmarks.sections import make_xraycap_step  # noqa: E402
from training.precision import cpu_has_bf16_matmuls  # noqa: E402

CPU_FIGURES = (
    "train_speedup_vs_seed",
    "train_compute_fraction",
    "beam_speedup_vs_nocache",
    "data_speedup_vs_png",
    "build_rss_growth",
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Toy ops on shared cores: one thread avoids OpenMP barrier stalls; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_reports_every_figure_in_json_and_a_markdown_table(tmp_path, capsys):
    output = tmp_path / "latest.json"
    assert run.main(["--smoke", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    figures = results["figures"]
    assert set(CPU_FIGURES) <= set(figures)
    for name in CPU_FIGURES:
        figure = figures[name]
        assert math.isfinite(figure["median"]) and figure["what"] in printed, name  # one table row per figure
    for name in CPU_FIGURES[:-1]:  # ratios and the compute fraction: positive, with their spread
        figure = figures[name]
        assert 0 < figure["min"] <= figure["median"] <= figure["max"] and figure["n"] == 2, name
    series = results["sections"]["build"]["series"]
    assert [row["images"] for row in series] == [40, 80]
    # The growth is the largest build's peak over the smallest's.
    growth = series[-1]["peak_rss_mb"] / series[0]["peak_rss_mb"] - 1
    assert figures["build_rss_growth"]["median"] == pytest.approx(growth)
    # The 1.5x training target applies where training runs in bf16 (this CPU has bf16 matmul hardware) only.
    assert figures["train_speedup_vs_seed"]["target"] == (">= 1.5" if cpu_has_bf16_matmuls() else None)
    assert figures["train_compute_fraction"]["target"] is None
    assert figures["beam_speedup_vs_nocache"]["target"] == ">= 3.0"
    assert results["sections"]["beam"]["outputs_equal"] is True
    assert results["machine"]["cpu_bf16_matmul_hardware"] == cpu_has_bf16_matmuls()
    assert results["machine"]["cpu"] and results["machine"]["versions"]["torch"] == torch.__version__
    assert printed.startswith("| Figure | xraycap | Baseline |")
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == len(figures) + 2  # header, separator, one row per figure
    assert len(output.read_text().splitlines()) < 200  # a results file stays short enough to read and commit
    if not torch.cuda.is_available():
        assert results["sections"]["gpu"] == {"skipped": "no CUDA device"}


def test_unknown_section_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "train,speed"])
    assert "unknown ['speed']" in capsys.readouterr().err


def test_seed_baseline_adds_the_image_vector_to_every_token_with_stock_gpt2():
    """The seed loop's model: no prefix (as many logits as text tokens), the same image vector added to every token
    embedding, a frozen encoder, and a GPT-2 with its stock settings holding xraycap's decoder weights."""
    model, _ = make_tiny_model_and_processor()
    seed = SeedCaptioner(model).eval()
    assert seed.decoder.config.activation_function == GPT2Config().activation_function
    assert not any(p.requires_grad for p in seed.encoder.parameters())
    batch = random_batch(model.config, batch_size=2, text_tokens=6)
    captured = {}
    hook = seed.decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        out = seed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["view_mask"])
        hook.remove()
        offset = captured["embeds"] - seed.decoder.get_input_embeddings()(batch["input_ids"])
        ids = batch["input_ids"]
        expected = model.language_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(seed.decoder(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset))
    assert offset.abs().sum() > 0


def test_xraycap_step_trains_fp32_weights_and_lowers_the_loss():
    """The benchmarked step is run_captioning's: fp32 weights stay fp32 under autocast, and repeated steps on one
    batch lower the loss."""
    model, _ = make_tiny_model_and_processor()
    model.set_vision_encoder_frozen(True)
    model.train()
    batch = random_batch(model.config, batch_size=2, text_tokens=8)
    inputs = {k: batch[k] for k in ("view_mask", "input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        inputs["image_features"] = model.get_image_features(batch["pixel_values"], batch["view_mask"])
    amp_dtype = torch.bfloat16 if cpu_has_bf16_matmuls() else None
    step = make_xraycap_step(model, inputs, amp_dtype)
    losses = [float(step()) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert {p.dtype for p in model.parameters()} == {torch.float32}
