"""The `scale` section: how the dataset build and a `--cache_features` training run grow with the number of studies.

For each size it writes phantom studies in the MIMIC-CXR-JPG layout (`python -m dataset_builder synthesize --format
mimic-cxr`), builds them with `--num_proc 1` and with every core (fresh caches; the two datasets must be identical
row for row), and trains a few steps on the built dataset with `run_captioning.py --cache_features true` and a
local random-weight ResNet whose features have ResNet-50's size (2,048 channels, 4 x 4 grid tokens per view at 224
px) but is narrow elsewhere. Each command runs in a fresh process; its peak memory is that of its whole process
tree (pool workers included), sampled every 250 ms (the sampler's own CPU seconds are recorded beside).

`benchmarks/scale_report.py` turns the results into docs/PERFORMANCE.md's table and its projection to MIMIC-CXR's
227,835 studies on a 16-core node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import datasets
import psutil
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 3


# The fields of /proc/<pid>/status (resident pages by kind) and smaps_rollup (proportional ones) summed per sample.
STATUS_FIELDS = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}
ROLLUP_FIELDS = {"Pss": "pss", "Pss_Anon": "pss_anon", "Pss_File": "pss_file"}
PEAKS = ("rss", "pss", "rss_anon", "rss_file", "rss_shmem", "pss_anon", "pss_file")


def process_memory(process: psutil.Process) -> dict[str, int]:
    """One process's resident memory in bytes: `rss` and `pss` (proportional set size: pages shared by forked
    workers counted once), and on Linux their kinds: `rss_anon` / `pss_anon` (the heap, tensors, Python objects),
    `rss_file` / `pss_file` (pages of mapped files: libraries and memory-mapped Arrow files, page cache the kernel
    can reclaim) and `rss_shmem` (shared memory: DataLoader batches in flight).

    Raises:
        `psutil.Error`: the process exited.
    """
    fields = dict.fromkeys(PEAKS, 0)
    try:
        for path, names in ((f"/proc/{process.pid}/status", STATUS_FIELDS), (f"/proc/{process.pid}/smaps_rollup", ROLLUP_FIELDS)):  # fmt: skip
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name in names:
                        fields[names[name]] = int(value.split()[0]) * 1024  # kB
        fields["rss"] = fields["rss_anon"] + fields["rss_file"] + fields["rss_shmem"]
    except FileNotFoundError:  # not Linux, or the process is gone
        if not psutil.pid_exists(process.pid):
            raise psutil.NoSuchProcess(process.pid) from None
        info = process.memory_full_info()
        fields["rss"], fields["pss"] = info.rss, getattr(info, "pss", info.rss)
    except ProcessLookupError:
        raise psutil.NoSuchProcess(process.pid) from None
    return fields


def measured_run(cmd: list[str], cwd: Path = REPO_ROOT, interval: float = 0.25) -> dict[str, Any]:
    """Runs `cmd` to its end; returns its wall seconds and the peak, over time, of its process tree's summed memory
    in MB ([`process_memory`]): `peak_rss_mb`, `peak_pss_mb`, and beside them the peaks of each kind
    (`peak_rss_anon_mb`, `peak_rss_file_mb`, `peak_rss_shmem_mb`, `peak_pss_anon_mb`, `peak_pss_file_mb`), so a
    growth can be told apart: anonymous memory the program holds, or pages of files it has read through a mapping.
    Every `interval` seconds the sampler reads each process's smaps, which costs CPU the measured command then lacks
    on a small machine: `sampler_cpu_s` is what it used.

    Raises:
        `RuntimeError`: the command failed; the message holds the end of its output.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    peak = dict.fromkeys(PEAKS, 0)
    root = psutil.Process(proc.pid)
    sampler_cpu = sum(psutil.Process().cpu_times()[:2])
    while proc.poll() is None:
        total = dict.fromkeys(PEAKS, 0)
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for process in tree:
            try:
                memory = process_memory(process)
            except (psutil.Error, OSError):  # exited between the listing and the read
                continue
            total = {key: total[key] + memory[key] for key in PEAKS}
        peak = {key: max(peak[key], total[key]) for key in PEAKS}
        time.sleep(interval)
    proc.wait()
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {''.join(output)[-3000:]}")
    seconds = time.perf_counter() - start
    sampler_cpu = sum(psutil.Process().cpu_times()[:2]) - sampler_cpu
    return {
        "seconds": round(seconds, 2),
        "sampler_cpu_s": round(sampler_cpu, 2),
        **{f"peak_{key}_mb": round(peak[key] / 2**20, 1) for key in PEAKS},
    }


def disk_bytes(*folders: Path) -> int:
    """Bytes on disk (allocated blocks) of the files under `folders`, a hard-linked file counted once."""
    seen, total = set(), 0
    for folder in folders:
        for path in Path(folder).rglob("*"):
            stat = path.lstat()
            if path.is_file() and (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def same_datasets(first: Path, second: Path) -> bool:
    """Whether two built dataset folders hold the same splits, columns and rows in the same order, and build
    reports with the same counts and skipped records."""
    a, b = datasets.load_from_disk(str(first)), datasets.load_from_disk(str(second))
    if list(a) != list(b) or any(a[s].features != b[s].features for s in a):
        return False
    if not all(a[s].data.table.equals(b[s].data.table) for s in a):
        return False
    reports = [json.loads((folder / "build_report.json").read_text()) for folder in (first, second)]
    return all(
        reports[0].get(key) == reports[1].get(key) for key in ("num_examples", "skipped", "num_reports")
    )


def save_towers(folder: Path) -> tuple[Path, Path]:
    """Random-weight towers saved locally (`save_pretrained`): a transformers ResNet whose grid features have
    ResNet-50's size (bottleneck blocks, 2,048 channels out of the last stage, stride 32) with one block per stage
    and narrow early stages, and a 2-layer GPT-2 with a byte-level BPE trained on a few report sentences."""
    from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetModel

    from processing_xraycap import train_tokenizer

    vision = ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64, 128, 2048], depths=[1, 1, 1, 1], layer_type="bottleneck"
    )
    ResNetModel(vision).save_pretrained(folder / "resnet")
    corpus = [
        "The lungs are clear. No pleural effusion or pneumothorax.",
        "The heart is mildly enlarged. There is a small right pleural effusion.",
        "Mild bibasilar atelectasis. No focal consolidation. Cardiomediastinal silhouette is normal.",
    ]
    tokenizer = train_tokenizer(corpus * 20, vocab_size=400)
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2, **ids)
    GPT2LMHeadModel(text).save_pretrained(folder / "gpt2")
    tokenizer.save_pretrained(folder / "gpt2")
    return folder / "resnet", folder / "gpt2"


def options(**values: Any) -> list[str]:
    """`--key value` pairs of a command line."""
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def scale_row(studies: int, workdir: Path, towers: tuple[Path, Path], seed: int = 0) -> dict[str, Any]:
    """One size: synthesize, build twice (`--num_proc 1`, every core), compare, measure disk, train a few steps."""
    python, cores = sys.executable, os.cpu_count() or 1
    layout, row = workdir / "layout", {"studies": studies}
    synthesize = options(format="mimic-cxr", output_dir=layout, num_studies=studies, seed=seed)
    proc = subprocess.run(
        [python, "-m", "dataset_builder", "synthesize", *synthesize],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"synthesize {synthesize} failed: {proc.stderr[-3000:]}")
    row["layout_bytes"] = disk_bytes(layout)
    for key, num_proc in (("num_proc_1", 1), ("all_cores", cores)):
        out, cache = workdir / f"built_{key}", workdir / f"cache_{key}"
        build = options(
            format="mimic-cxr", data_dir=layout, output_dir=out, cache_dir=cache, num_proc=num_proc
        )
        row[f"build_{key}"] = {
            "num_proc": num_proc,
            **measured_run([python, "-m", "dataset_builder", "build", *build]),
        }
        row[f"build_{key}"] |= {
            "output_bytes": disk_bytes(out),
            "output_and_cache_bytes": disk_bytes(out, cache),
        }
    row["datasets_identical"] = same_datasets(workdir / "built_num_proc_1", workdir / "built_all_cores")
    report = json.loads((workdir / "built_all_cores" / "build_report.json").read_text())
    row["num_examples"], row["skipped"] = report["num_examples"], len(report["skipped"])
    train = options(
        dataset_dir=workdir / "built_all_cores", cache_features="true", vision_model=towers[0], text_model=towers[1],
        image_size=224, visual_tokens="grid", grid_size=4, max_views=2, max_steps=TRAIN_STEPS,
        per_device_train_batch_size=16, do_eval="false",
        cache_dir=workdir / "xraycap_cache", output_dir=workdir / "run", overwrite_output_dir="true",
    )  # fmt: skip
    row["train_cache_features"] = {"steps": TRAIN_STEPS, "batch_size": 16}
    row["train_cache_features"] |= measured_run([python, "run_captioning.py", *train])
    row["train_cache_features"]["feature_cache_bytes"] = disk_bytes(
        workdir / "xraycap_cache" / "feature_cache"
    )
    return row


def scale_section(sizes: tuple[int, ...], workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Every size in `sizes` (phantom MIMIC-CXR studies), each in its own folder, removed after its row.

    Returns:
        `dict`: `rows` (one per size), `setup` and `figures` (the growth of each peak from the first size to the
        last, and the all-cores build's speedup at the largest size).
    """
    import shutil

    if len(sizes) < 2 or sorted(sizes) != list(sizes):
        raise ValueError(
            f"--scale_sizes {sizes}: give two or more sizes in increasing order, e.g. 1000,4000,16000"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    towers = save_towers(workdir / "towers")
    rows = []
    for studies in tqdm(sizes, desc="scale sizes", leave=False):
        folder = workdir / f"size_{studies}"
        rows.append(scale_row(studies, folder, towers, seed))
        shutil.rmtree(folder, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth = {
        "build_num_proc_1_rss_growth": ("build_num_proc_1", "peak_rss_mb", "build peak RSS, --num_proc 1"),
        "build_all_cores_rss_growth": ("build_all_cores", "peak_rss_mb", "build peak RSS (process tree), all cores"),
        "train_cache_features_rss_growth": ("train_cache_features", "peak_rss_mb", "training peak RSS, --cache_features"),
        "build_all_cores_pss_growth": ("build_all_cores", "peak_pss_mb", "build peak PSS (process tree), all cores"),
        "train_cache_features_pss_growth": ("train_cache_features", "peak_pss_mb", "training peak PSS, --cache_features"),
        # What grows: anonymous memory the processes hold, or pages of the (memory-mapped Arrow) files they read.
        "build_all_cores_rss_anon_growth": ("build_all_cores", "peak_rss_anon_mb", "build peak RssAnon (process tree), all cores"),
        "build_all_cores_rss_file_growth": ("build_all_cores", "peak_rss_file_mb", "build peak RssFile (process tree), all cores"),
        "train_cache_features_rss_anon_growth": ("train_cache_features", "peak_rss_anon_mb", "training peak RssAnon, --cache_features"),
        "train_cache_features_rss_file_growth": ("train_cache_features", "peak_rss_file_mb", "training peak RssFile, --cache_features"),
    }  # fmt: skip
    figures = {
        name: {
            "median": last[key][field] / first[key][field] - 1,
            "what": f"{what} growth, {first['studies']:,} to {last['studies']:,} studies",
            "xraycap": f"{first[key][field]:.0f} -> {last[key][field]:.0f} MB",
            "baseline": "-",
        }
        for name, (key, field, what) in growth.items()
        if first[key].get(field)  # the kinds are read from /proc: Linux only
    }
    speedup = last["build_num_proc_1"]["seconds"] / last["build_all_cores"]["seconds"]
    figures["build_speedup_all_cores"] = {
        "median": speedup,
        "what": f"build speedup, {last['build_all_cores']['num_proc']} processes vs 1, {last['studies']:,} studies, "
        f"datasets identical: {all(row['datasets_identical'] for row in rows)}",
        "xraycap": f"{last['build_all_cores']['seconds']:.1f} s",
        "baseline": f"{last['build_num_proc_1']['seconds']:.1f} s --num_proc 1",
    }
    setup = {"sizes": list(sizes), "seed": seed, "train_steps": TRAIN_STEPS, "vision_tower": "ResNet bottleneck "
             "[32, 64, 128, 2048] channels, 1 block per stage, 224 px, 4 x 4 grid, 2 views"}  # fmt: skip
    return {"setup": setup, "rows": rows, "figures": figures}
