"""Folder locks: a file system without flock gets a working lock and a warning naming the folder; two
downloads into one folder never run at the same time."""

import errno
import fcntl
import logging
import multiprocessing
import os
import sys
import time
import types

import filelock
import pytest
from xraycap.dataset_builder import download
from xraycap.dataset_builder.folders import folder_lock


@pytest.mark.parametrize("failure", ["ENOLCK", "NotImplementedError"])
def test_lock_without_flock_falls_back_and_says_so(tmp_path, monkeypatch, caplog, failure):
    if failure == "ENOLCK":  # NFS without a lock daemon: flock fails with "No locks available"

        def no_flock(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
    else:  # what filelock < 3.30 raises on such a file system

        def not_implemented(self, *args, **kwargs):
            raise NotImplementedError("FileSystem does not appear to support flock; use SoftFileLock instead")

        monkeypatch.setattr(filelock.FileLock, "acquire", not_implemented)
    folder = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="xraycap.dataset_builder.folders"):
        with folder_lock(folder):
            held = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".soft"))
            assert held == [".cache.lock.soft"]
    assert not (tmp_path / ".cache.lock.soft").exists()  # released
    message = caplog.text
    assert str(folder) in message and "no flock" in message and "delete" in message


def _fake_kagglehub(log_path: str) -> types.ModuleType:
    def dataset_download(handle, output_dir=None, force_download=False):
        with open(log_path, "a") as fh:
            fh.write(f"start {os.getpid()}\n")
        time.sleep(0.6)
        for name in ("indiana_reports.csv", "indiana_projections.csv"):
            with open(os.path.join(output_dir, name), "w") as fh:
                fh.write("uid\n")
        with open(log_path, "a") as fh:
            fh.write(f"end {os.getpid()}\n")
        return output_dir

    return types.SimpleNamespace(dataset_download=dataset_download)


def _download_into(folder: str) -> None:
    download(folder)


def test_two_downloads_into_one_folder_take_turns(tmp_path, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setitem(sys.modules, "kagglehub", _fake_kagglehub(str(log)))
    context = multiprocessing.get_context("fork")  # the children inherit the fake kagglehub
    workers = [context.Process(target=_download_into, args=(str(tmp_path / "indiana"),)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["start", "end", "start", "end"]  # never two at once
