"""The GPU benchmark (`python benchmarks/run.py --device cuda`): absolute rates at real size, for projections.

At `configs/iu_r2gen.yaml`'s shapes (ResNet-50 + GPT-2 small with random weights, 2 views, 4 x 4 grid tokens,
batch 16, beam 3) it measures, in the precision `--mixed_precision auto` picks on the card:
- training samples/s with cached features and with the frozen tower in the loop, and each step's model FLOPs
  utilisation (MFU) against the card's dense tensor-core peak (`PEAK_TFLOPS`; unknown cards: MFU omitted);
- the frozen encoder's studies/s (the one-off `--cache_features` pass and the nearest-train floor's pass);
- beam-3 generation studies/s from images, under autocast (validation) and in fp32 (test);
- the data loader's samples/s from a built dataset, beside the demand of the step that decodes images.

The same code runs on CPU at toy sizes (`--device cpu --sections gpu --smoke`), which is how it is tested.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from xraycap.dataset_builder import build_dataset, synthesize

from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer
from xraycap.training.data import IndexedStudies, StudyCollator

from .inputs import random_batch
from .sections import REPO_ROOT, autocast_dtype, build_model, make_xraycap_step, summarize, timed

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets, in the precision `auto` trains in
# on that card: bf16 on Ampere and later, fp16 on Volta / Turing (no native bf16). First match wins, so the
# more specific names come first. (pattern on torch.cuda.get_device_name(), card, precision, TFLOP/s)
PEAK_TFLOPS: tuple[tuple[str, str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", "bf16", 756.0),
    (r"H100 NVL", "H100 NVL", "bf16", 835.0),
    (r"H200 NVL", "H200 NVL", "bf16", 835.0),
    (r"H200", "H200 SXM / GH200", "bf16", 989.0),
    (r"H100", "H100 SXM", "bf16", 989.0),
    (r"A100", "A100", "bf16", 312.0),
    (r"L40S", "L40S", "bf16", 362.0),
    (r"\bL4\b", "L4", "bf16", 121.0),
    (r"\bA10\b", "A10", "bf16", 125.0),
    (r"V100S", "V100S", "fp16", 130.0),
    (r"V100.*PCIE", "V100 PCIe", "fp16", 112.0),
    (r"V100", "V100 SXM2", "fp16", 125.0),
    (r"\bT4\b", "T4", "fp16", 65.0),
)


def peak_flops(device_name: str) -> dict[str, Any] | None:
    """The card's dense tensor-core peak from `PEAK_TFLOPS`, or None for a card (or CPU) not in the table.

    Args:
        device_name (`str`): what `torch.cuda.get_device_name()` says, e.g. "NVIDIA H100 80GB HBM3".

    Returns:
        `dict | None`: `{"card", "precision", "flops_per_second"}`.
    """
    for pattern, card, precision, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return {"card": card, "precision": precision, "flops_per_second": tflops * 1e12}
    return None


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """Shapes and repeats of the GPU benchmark. `from_config` reads the model, batch and generation shapes of a
    config file; `text_tokens` is a typical IU findings report in GPT-2 tokens (the config's cap is 128);
    generation is forced to exactly `new_tokens` (the config's `max_new_tokens`: an upper bound)."""

    preset: str = "resnet50-gpt2"
    batch_size: int = 16
    eval_batch_size: int = 64
    text_tokens: int = 60
    num_beams: int = 3
    new_tokens: int = 100
    warmup_steps: int = 5
    repeats: int = 20
    beam_repeats: int = 2
    loader_studies: int = 512
    loader_image_px: int = 512
    loader_workers: int = min(os.cpu_count() or 1, 8)
    loader_epochs: int = 2

    @classmethod
    def from_config(cls, path: Path = REPO_ROOT / "configs" / "iu_r2gen.yaml", **changes) -> GpuSettings:
        values = yaml.safe_load(Path(path).read_text())
        taken = {
            "preset": values.get("preset", cls.preset),
            "batch_size": values.get("per_device_train_batch_size", cls.batch_size),
            "eval_batch_size": values.get("per_device_eval_batch_size", cls.eval_batch_size),
            "num_beams": values.get("num_beams", cls.num_beams),
            "new_tokens": values.get("max_new_tokens", cls.new_tokens),
        }
        return cls(**{**taken, **changes})


# fmt: off
GPU_SMOKE = GpuSettings(  # every code path at toy sizes, on CPU in seconds: the section's own test
    preset="tiny", batch_size=2, eval_batch_size=2, text_tokens=8, num_beams=3, new_tokens=4, warmup_steps=1,
    repeats=2, beam_repeats=1, loader_studies=24, loader_image_px=64, loader_workers=0, loader_epochs=1,
)
# fmt: on


def rate(samples: int, seconds: list[float]) -> dict[str, Any]:
    """Samples per second of each timed repeat, summarized (median, min, max, n)."""
    return summarize([samples / s for s in seconds])


def train_rates(settings: GpuSettings, device: torch.device, model, peak: dict | None) -> dict[str, Any]:
    """Training samples/s with cached features and with the frozen tower in the loop, each step's FLOPs
    (`FlopCounterMode`, forward + backward) and, with a known peak, its MFU."""
    amp_dtype = autocast_dtype(device.type)
    batch = random_batch(model.config, settings.batch_size, settings.text_tokens)
    batch = {k: v.to(device) for k, v in batch.items()}
    text = {k: batch[k] for k in ("view_mask", "input_ids", "attention_mask", "labels")}
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)),
    ):
        features = model.get_image_features(batch["pixel_values"], batch["view_mask"])
    variants = {"cached_features": {**text, "image_features": features}, "tower_in_loop": batch}
    results = {}
    for name, inputs in variants.items():
        step = make_xraycap_step(model, inputs, amp_dtype)
        for _ in range(settings.warmup_steps):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        seconds = [timed(step, device)[0] for _ in tqdm(range(settings.repeats), desc=name, leave=False)]
        samples = rate(settings.batch_size, seconds)
        results[name] = {"samples_per_second": samples, "flops_per_step": flops}
        if peak is not None:
            results[name]["mfu"] = summarize([flops / s / peak["flops_per_second"] for s in seconds])
    return results


@torch.no_grad()
def inference_rates(settings: GpuSettings, device: torch.device, model) -> dict[str, Any]:
    """The frozen encoder's studies/s under autocast, and beam search from images (the encoder included, as
    evaluation runs it): under autocast (validation each epoch) and in fp32 (test, as a reloaded model)."""
    amp_dtype = autocast_dtype(device.type)
    model.eval()
    batch = random_batch(model.config, settings.eval_batch_size, 2, seed=1)
    images = {k: batch[k].to(device) for k in ("pixel_values", "view_mask")}
    autocast = {"device_type": device.type, "dtype": amp_dtype or torch.float32, "enabled": bool(amp_dtype)}
    generation = {"num_beams": settings.num_beams, "do_sample": False}
    generation |= {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens}

    def encode():
        with torch.autocast(**autocast):
            return model.get_image_features(**images)

    def generate(amp: bool):
        with torch.autocast(**{**autocast, "enabled": amp and autocast["enabled"]}):
            return model.generate(**images, **generation)

    results = {}
    runs = {
        "encode": (encode, settings.repeats),
        "beam_autocast": (lambda: generate(True), settings.beam_repeats),
    }
    runs["beam_fp32"] = (lambda: generate(False), settings.beam_repeats)
    for name, (fn, repeats) in runs.items():
        fn()  # warm-up
        seconds = [timed(fn, device)[0] for _ in tqdm(range(repeats), desc=name, leave=False)]
        results[name] = {"studies_per_second": rate(settings.eval_batch_size, seconds)}
    model.train()
    return results


def loader_rate(settings: GpuSettings, device: torch.device, model, workdir: Path) -> dict[str, Any]:
    """Training batches from a built dataset (phantom studies stored at `loader_image_px`): `IndexedStudies` +
    `StudyCollator` decoding and processing both views, `loader_workers` workers, pinned memory on a GPU."""
    layout = synthesize(
        workdir / "layout", num_studies=settings.loader_studies, image_size=settings.loader_image_px
    )
    dataset, _ = build_dataset(layout, image_size=settings.loader_image_px, cache_dir=workdir / "cache")
    split = datasets.concatenate_datasets([part for part in dataset.values() if len(part)])  # every study
    tokenizer = train_tokenizer(list(split["report"]) * 4, vocab_size=300)
    image_processor = XrayCapImageProcessor(size=model.config.image_size)
    processor = XrayCapProcessor(image_processor, tokenizer, max_views=model.config.max_views)
    collator = StudyCollator(processor, model.config.max_views, max_target_length=128)
    workers = settings.loader_workers
    loader = DataLoader(
        IndexedStudies(split), batch_size=settings.batch_size, collate_fn=collator, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda", shuffle=True,
    )  # fmt: skip

    def epoch() -> int:
        return sum(len(b["pixel_values"].to(device, non_blocking=True)) for b in loader)

    epoch()  # warm-up: worker start, page cache
    seconds = [timed(epoch, device)[0] for _ in range(settings.loader_epochs)]
    setup = {"studies": len(split), "stored_px": settings.loader_image_px, "num_workers": workers}
    return {"samples_per_second": rate(len(split), seconds), "setup": setup}


# The IU benchmark run of configs/iu_r2gen.yaml: R2Gen's split and schedule.
IU_RUN = {"train": 2069, "validation": 296, "test": 590, "epochs": 30}


def iu_run_projection(section: dict[str, Any], run: dict[str, int] = IU_RUN) -> dict[str, Any]:
    """The seconds of the whole IU benchmark run (`configs/iu_r2gen.yaml` on one GPU) from the section's rates:
    each term is studies / the rate that bounds it (a step that decodes images is bounded by the loader too).

    - features: the one-off `--cache_features` pass over train, N_train / min(R_encode, R_loader);
    - training: epochs x N_train / R_train(cached features);
    - validation: epochs x N_validation / min(R_beam(autocast), R_loader), beam-3 from images each epoch;
    - test: 2 x N_test / min(R_beam(fp32), R_loader), the test split and its grey-image floor;
    - floor: (N_train + N_test) / min(R_encode, R_loader), the nearest-train floor's pooled encoding.
    Not included: scoring on the CPU, checkpoint writes, process start.
    """
    rate = {key: figure["median"] for key, figure in section["figures"].items()}
    loader = rate["gpu_loader_samples_per_s"]
    encode = min(rate["gpu_encode_studies_per_s"], loader)
    terms = {
        "features": (run["train"], encode),
        "training": (run["epochs"] * run["train"], rate["gpu_train_samples_per_s_cached_features"]),
        "validation": (
            run["epochs"] * run["validation"],
            min(rate["gpu_beam_autocast_studies_per_s"], loader),
        ),
        "test": (2 * run["test"], min(rate["gpu_beam_fp32_studies_per_s"], loader)),
        "floor": (run["train"] + run["test"], encode),
    }
    seconds = {name: studies / per_second for name, (studies, per_second) in terms.items()}
    arithmetic = {name: f"{studies:,} / {per_second:.1f}/s" for name, (studies, per_second) in terms.items()}
    return {"run": run, "seconds": seconds, "arithmetic": arithmetic, "total_seconds": sum(seconds.values())}


def gpu_section(
    settings: GpuSettings, device: str, workdir: Path, peak_tflops: float | None = None
) -> dict[str, Any]:
    """Runs the GPU benchmark on `device` and returns its figures.

    Args:
        settings (`GpuSettings`): shapes and repeats (`GpuSettings.from_config()`, or `GPU_SMOKE`).
        device (`str`): "cuda", or "cpu" to run the same code at toy sizes (its test).
        workdir (`Path`): where the loader's phantom dataset is built.
        peak_tflops (`float`, *optional*): the card's dense peak in the training precision, for a card not in
            `PEAK_TFLOPS`; it replaces the table's figure.
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    notes = []
    if peak_tflops is not None:
        peak = {"card": f"{name}, given", "precision": None, "flops_per_second": peak_tflops * 1e12}
    if peak is None:
        notes.append(
            f"MFU omitted: {name!r} is not in benchmarks/gpu.py PEAK_TFLOPS (dense tensor-core peaks by card); "
            "give its datasheet figure with --peak_tflops, or add it to the table."
        )
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device.type)]
    if peak is not None and peak["precision"] not in (None, precision):
        notes.append(f"the peak is {peak['precision']}, the run trains in {precision}")
    model = build_model(settings.preset).to(device).train()
    train = train_rates(settings, device, model, peak)
    inference = inference_rates(settings, device, model)
    loader = loader_rate(settings, device, model, workdir)
    shape = f"{settings.preset}, batch {settings.batch_size}, {settings.text_tokens} tokens, {precision}"
    demand = train["tower_in_loop"]["samples_per_second"]["median"]
    figures = {}
    for key, what in (("cached_features", "cached features"), ("tower_in_loop", "frozen tower in the loop")):
        figures[f"gpu_train_samples_per_s_{key}"] = {
            **train[key]["samples_per_second"], "what": f"training samples/s, {what}, {shape}",
            "xraycap": f"{train[key]['flops_per_step'] / 1e9:.3g} GFLOP/step", "baseline": "-",
        }  # fmt: skip
        if "mfu" in train[key]:
            figures[f"gpu_mfu_{key}"] = {
                **train[key]["mfu"], "what": f"MFU, training with {what}",
                "xraycap": f"{train[key]['flops_per_step'] / 1e9:.3g} GFLOP/step",
                "baseline": f"{peak['flops_per_second'] / 1e12:.4g} TFLOP/s {peak['precision'] or precision} ({peak['card']})",
            }  # fmt: skip
    figures["gpu_encode_studies_per_s"] = {
        **inference["encode"]["studies_per_second"], "baseline": "-", "xraycap": f"batch {settings.eval_batch_size}",
        "what": f"frozen encoder studies/s ({model.config.max_views} views), {precision}",
    }  # fmt: skip
    for key, how in (("beam_autocast", precision + " (validation)"), ("beam_fp32", "fp32 (test)")):
        figures[f"gpu_{key}_studies_per_s"] = {
            **inference[key]["studies_per_second"], "baseline": "-", "xraycap": f"batch {settings.eval_batch_size}",
            "what": f"beam-{settings.num_beams} generation studies/s from images, {settings.new_tokens} tokens, {how}",
        }  # fmt: skip
    figures["gpu_loader_samples_per_s"] = {
        **loader["samples_per_second"], "xraycap": f"{loader['setup']['num_workers']} workers",
        "what": f"data loader samples/s, {settings.loader_image_px}-px PNGs decoded, both views",
        "baseline": f"{demand:.1f} samples/s demanded by the tower-in-the-loop step",
    }  # fmt: skip
    section = {
        "setup": {"card": name, "precision": precision, "peak": peak, **dataclasses.asdict(settings)},
        "train": train,
        "inference": inference,
        "loader": loader,
        "figures": figures,
    }
    section["iu_run_projection"] = projection = iu_run_projection(section)
    parts = ", ".join(f"{key} {projection['arithmetic'][key]}" for key in projection["seconds"])
    notes.append(
        f"the IU benchmark run (R2Gen split, 30 epochs, beam-3): {projection['total_seconds'] / 60:.1f} min ({parts})"
    )
    return {**section, "notes": notes}
