"""Two processes on one default cache: one synthesizes and builds, the other waits and reuses."""

import json
import subprocess
import sys
import time
from pathlib import Path

# each process gets ready (imports done), waits for the go file, then synthesizes + builds on the shared cache
RUNNER = """
import json, logging, sys, time
from pathlib import Path
from xraycap.dataset_builder import build_dataset, synthesize
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
root = Path(sys.argv[1])
(root / f"ready-{sys.argv[2]}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
data = synthesize(root / "data", num_studies=6, seed=1, image_size=64, num_proc=1)
_, report = build_dataset(data, image_size=48, cache_dir=root / "cache")
print(json.dumps({"reused_cache": report["reused_cache"], "fingerprint": report["fingerprint"]}))
"""


def test_two_processes_synthesize_and_build_once(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a runner did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert sorted(r["reused_cache"] for r in reports) == [False, True]  # built once, reused once
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    logs = "".join(err for _, err in results)
    assert logs.count("Wrote 6 phantom studies") == 1, logs[-3000:]
