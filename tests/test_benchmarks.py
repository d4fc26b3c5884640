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

from benchmarks import gpu, run  # noqa: E402
from benchmarks.baselines import SeedCaptioner  # noqa: E402
from benchmarks.inputs import random_batch  # noqa: E402
from benchmarks.sections import make_xraycap_step  # noqa: E402
from xraycap.training.distributed import cpu_has_bf16_matmuls  # noqa: E402

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
    assert set(results["sections"]) == {
        "train",
        "beam",
        "data",
        "build",
    }  # the GPU and scale sections: on request


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
        expected = model.eval()(input_ids=ids).logits  # without an image: GPT-2 on the text
        torch.testing.assert_close(seed.decoder(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset))
    assert offset.abs().sum() > 0


def test_xraycap_step_trains_fp32_weights_and_lowers_the_loss():
    """The benchmarked step is run_captioning's: fp32 weights stay fp32 under autocast, and repeated steps on one
    batch lower the loss."""
    model, _ = make_tiny_model_and_processor(freeze_vision_encoder=True)
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


def test_device_cuda_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, card, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", "bf16", 989),
        ("NVIDIA H100 PCIe", "H100 PCIe", "bf16", 756),
        ("NVIDIA H200", "H200 SXM / GH200", "bf16", 989),
        ("NVIDIA A100-SXM4-80GB", "A100", "bf16", 312),
        ("NVIDIA A10", "A10", "bf16", 125),
        ("NVIDIA L4", "L4", "bf16", 121),
        ("NVIDIA L40S", "L40S", "bf16", 362),
        ("Tesla T4", "T4", "fp16", 65),
        ("Tesla V100-SXM2-16GB", "V100 SXM2", "fp16", 125),
        ("NVIDIA GeForce RTX 3090", None, None, None),
    ],
)
def test_card_peaks_are_looked_up_by_device_name(name, card, precision, tflops):
    peak = gpu.peak_flops(name)
    if card is None:
        assert peak is None
    else:
        assert peak == {"card": card, "precision": precision, "flops_per_second": tflops * 1e12}


def test_gpu_section_runs_on_cpu_at_toy_size_and_omits_mfu_for_an_unknown_card(tmp_path, capsys):
    output = tmp_path / "card.json"
    assert run.main(["--device", "cpu", "--sections", "gpu", "--smoke", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    figures = results["figures"]
    expected = {
        "gpu_train_samples_per_s_cached_features",
        "gpu_train_samples_per_s_tower_in_loop",
        "gpu_encode_studies_per_s",
        "gpu_beam_autocast_studies_per_s",
        "gpu_beam_fp32_studies_per_s",
        "gpu_loader_samples_per_s",
    }
    assert set(figures) == expected  # no MFU: the CPU is not a card of the peak table
    assert all(0 < figures[name]["min"] <= figures[name]["max"] for name in expected)
    assert "note: MFU omitted: 'cpu' is not in" in printed
    section = results["sections"]["gpu"]
    assert section["setup"]["card"] == "cpu" and section["setup"]["num_beams"] == 3
    demand = section["train"]["tower_in_loop"]["samples_per_second"]["median"]
    assert f"{demand:.1f} samples/s demanded" in figures["gpu_loader_samples_per_s"]["baseline"]
    machine = results["machine"]
    assert machine["versions"]["torch"] == torch.__version__ and machine["git_commit"]
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == len(figures) + 2
    # The IU run's projection: 30 epochs of 2,069 studies at the cached-features rate, and so on.
    projection = section["iu_run_projection"]
    assert projection["seconds"]["training"] == pytest.approx(
        30 * 2069 / figures["gpu_train_samples_per_s_cached_features"]["median"]
    )
    assert projection["total_seconds"] == pytest.approx(sum(projection["seconds"].values()))
    assert "note: the IU benchmark run (R2Gen split, 30 epochs, beam-3)" in printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_runs_the_gpu_section_on_the_card_at_toy_size(tmp_path):
    output = tmp_path / "card.json"
    assert run.main(["--device", "cuda", "--smoke", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    setup = results["sections"]["gpu"]["setup"]
    assert setup["card"] == torch.cuda.get_device_name(0) == results["machine"]["gpu"]
    assert setup["precision"] in ("bf16", "fp16")
    known = gpu.peak_flops(setup["card"]) is not None
    assert ("gpu_mfu_cached_features" in results["figures"]) == known
    assert run.parse_args(["--device", "cuda"]).output.endswith(run.card_slug(setup["card"]) + ".json")


def test_gpu_section_reports_mfu_against_a_given_peak(tmp_path):
    output = tmp_path / "card.json"
    argv = [
        "--device",
        "cpu",
        "--sections",
        "gpu",
        "--smoke",
        "--peak_tflops",
        "0.5",
        "--output",
        str(output),
    ]
    assert run.main(argv) == 0
    results = json.loads(output.read_text())
    train = results["sections"]["gpu"]["train"]
    for key in ("cached_features", "tower_in_loop"):
        mfu = results["figures"][f"gpu_mfu_{key}"]
        assert "0.5 TFLOP/s" in mfu["baseline"]
        # MFU = the step's counted FLOPs x steps per second / the peak
        steps_per_second = train[key]["samples_per_second"]["median"] / gpu.GPU_SMOKE.batch_size
        assert mfu["median"] == pytest.approx(train[key]["flops_per_step"] * steps_per_second / 0.5e12)


def test_the_gpu_benchmark_takes_the_r2gen_config_shapes():
    settings = gpu.GpuSettings.from_config()
    assert (settings.preset, settings.batch_size, settings.num_beams, settings.new_tokens) == (
        "resnet50-gpt2",
        16,
        3,
        100,
    )


def test_results_file_of_a_card_is_named_for_it():
    assert run.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
