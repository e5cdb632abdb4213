"""``atomic_directory`` / ``atomic_file``: whole versions only, failures keep the previous one, a disk that
refuses the bytes gives a one-line ``SaveError``, and a dead writer's leftovers are cleaned up."""

from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import signal
import stat
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import save_file

import deltatune.io
import deltatune.runtime.atomic
from deltatune.errors import DeltaTuneError, SaveError
from deltatune.runtime.atomic import atomic_directory, atomic_file
from file_trees import read_tree, write_tree
from tiny_models import SCENARIOS, delta_model

OLD = {"model.safetensors": b"old weights", "config.json": b"{}"}
NEW = {"model.safetensors": b"new weights" * 1000, "tokenizer.json": b"{}", "sub/extra.txt": b"x"}


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """``tmp_path/out`` holding the OLD version, written atomically."""
    with atomic_directory(tmp_path / "out") as staging:
        write_tree(staging, OLD)
    return tmp_path / "out"


def test_a_new_folder_appears_whole_with_the_usual_permissions(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "a" / "out") as staging:
        assert staging.parent == tmp_path / "a" and staging.name.startswith(".out.") and not any(staging.iterdir())
        write_tree(staging, NEW)
        assert not (tmp_path / "a" / "out").exists()  # nothing at the target until the block ends
    assert read_tree(tmp_path / "a" / "out") == NEW
    assert _entries(tmp_path / "a") == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("exchange", ["renameat2", "two-renames"])
def test_an_existing_folder_is_replaced_whole(previous: Path, exchange: str, monkeypatch) -> None:
    if exchange == "two-renames":  # e.g. macOS: no atomic exchange of two names

        def unsupported(first, second):
            raise OSError(errno.ENOSYS, "renameat2 is not available on this system")

        monkeypatch.setattr(deltatune.runtime.atomic, "_exchange", unsupported)
    with atomic_directory(previous) as staging:
        write_tree(staging, NEW)
    assert read_tree(previous) == NEW  # old-only files are gone too
    assert _entries(previous.parent) == ["out"]


def test_a_failing_block_keeps_the_previous_version(previous: Path) -> None:
    with pytest.raises(ValueError, match="serialiser bug"):
        with atomic_directory(previous) as staging:
            write_tree(staging, NEW)
            raise ValueError("serialiser bug")
    assert read_tree(previous) == OLD
    assert _entries(previous.parent) == ["out"]


def _fail_with(exc: Exception):
    def block(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"half of the weights")
        raise exc

    return block


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (_fail_with(OSError(errno.ENOSPC, "No space left on device")), "No space left on device"),
        (_fail_with(OSError(errno.EDQUOT, "Disk quota exceeded")), "Disk quota exceeded"),
        (
            _fail_with(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
            "No space left on device",
        ),
        (
            _fail_with(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
            "No space left on device",
        ),  # torch.save on a full disk, which statvfs reports as full
    ],
    ids=["ENOSPC", "EDQUOT", "safetensors", "torch.save"],
)
def test_out_of_space_is_one_line_naming_the_target_and_keeps_the_previous_version(
    previous: Path, failure, reason: str, monkeypatch
) -> None:
    real_statvfs = os.statvfs

    def full_disk(path):
        result = real_statvfs(path)
        return os.statvfs_result((*result[:4], 0, *result[5:]))  # f_bavail = 0

    monkeypatch.setattr(deltatune.runtime.atomic.os, "statvfs", full_disk)
    with pytest.raises(SaveError) as info:
        with atomic_directory(previous) as staging:
            failure(staging)
    message = str(info.value)
    assert f"could not write {previous}: {reason}; free space on that disk" in message and "\n" not in message
    assert "previous version is kept" in message
    assert isinstance(info.value, DeltaTuneError) and isinstance(info.value.__cause__, Exception)
    assert read_tree(previous) == OLD
    assert _entries(previous.parent) == ["out"]


def test_other_errors_are_not_reported_as_a_full_disk(previous: Path) -> None:
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the disk has room: not a space problem
        with atomic_directory(previous) as staging:
            _fail_with(RuntimeError("unexpected pos 576 vs 534"))(staging)
    assert read_tree(previous) == OLD


@pytest.fixture
def file_size_limit():
    """A real kernel refusal: writes past 32 KiB fail with EFBIG (SIGXFSZ ignored) until the test ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_real_write_refused_by_the_kernel_keeps_the_previous_folder(previous: Path, file_size_limit) -> None:
    with pytest.raises(SaveError, match=rf"could not write {previous}: File too large; free space"):
        with atomic_directory(previous) as staging:
            (staging / "model.safetensors").write_bytes(b"\0" * 200_000)
    assert read_tree(previous) == OLD
    assert _entries(previous.parent) == ["out"]


def test_a_real_adapter_save_refused_by_the_kernel_keeps_the_previous_adapter(tmp_path: Path, file_size_limit) -> None:
    """Through safetensors' own writer: an all-linear r=16 adapter of the tiny llama is ~64 KB."""
    delta_model(SCENARIOS["llama_linear"], r=1).save_pretrained(tmp_path)  # ~4 KB: under the limit
    before = read_tree(tmp_path)
    with pytest.raises(SaveError, match=r"adapter_model\.safetensors: File too large; free space"):
        delta_model(SCENARIOS["llama_linear"], r=16, seed=3).save_pretrained(tmp_path)
    assert read_tree(tmp_path) == before


def test_out_of_space_in_an_adapter_save_keeps_the_previous_files(tmp_path: Path, monkeypatch) -> None:
    """safetensors reports a full disk as "... (os error 28)" after writing part of the file."""
    delta_model(SCENARIOS["llama_linear"]).save_pretrained(tmp_path)
    before = read_tree(tmp_path)

    def disk_fills_up(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(deltatune.io, "save_file", disk_fills_up)
    with pytest.raises(SaveError, match=r"could not write .*adapter_model\.safetensors: No space left on device"):
        delta_model(SCENARIOS["llama_linear"], seed=4).save_pretrained(tmp_path)
    assert read_tree(tmp_path) == before


def _die_between_the_two_renames(target: Path) -> None:
    """In a child: replace ``target`` without renameat2, and die by SIGKILL after moving the old one aside."""
    deltatune.runtime.atomic._exchange = lambda first, second: (_ for _ in ()).throw(OSError(errno.ENOSYS, "none"))
    real_rename = os.rename

    def rename_then_die(source, destination):
        real_rename(source, destination)
        if str(destination).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    with atomic_directory(target) as staging:
        write_tree(staging, NEW)


def test_a_crash_between_two_renames_is_undone_by_the_next_write(previous: Path) -> None:
    child = multiprocessing.get_context("fork").Process(target=_die_between_the_two_renames, args=(previous,))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not previous.exists()  # the window the fallback has; renameat2 has none
    aside = [name for name in _entries(previous.parent) if name.endswith(".old")]
    assert len(aside) == 1 and f".{child.pid}." in aside[0]
    with pytest.raises(ValueError):
        with atomic_directory(previous):  # the next write puts the previous version back first
            assert read_tree(previous) == OLD
            raise ValueError("stop here")
    assert read_tree(previous) == OLD
    assert _entries(previous.parent) == ["out"]


def test_leftovers_of_dead_writers_go_and_others_stay(previous: Path) -> None:
    parent = previous.parent
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()  # a pid that no process has now
    dead, alive = child.pid, os.getppid()
    names = [
        f".out.{dead}.abc123.tmp",  # a dead writer's staging folder: removed
        f".out.{alive}.abc123.tmp",  # a live writer's: kept
        f".other.{dead}.abc123.tmp",  # another target's: kept
        f".out.5.{dead}.abc123.tmp",  # target "out.5"'s, not "out"'s: kept
    ]
    for name in names:
        (parent / name).mkdir()
        (parent / name / "f").write_bytes(b"x")
    (parent / f".out.{dead}.zz.tmp").write_bytes(b"a dead writer's temporary file")
    with atomic_directory(previous) as staging:
        write_tree(staging, NEW)
    remaining = set(_entries(parent))
    assert remaining == {"out", f".out.{alive}.abc123.tmp", f".other.{dead}.abc123.tmp", f".out.5.{dead}.abc123.tmp"}


def test_atomic_file_replaces_one_file_and_cleans_its_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    (tmp_path / f".config.json.{child.pid}.k9.tmp").write_text("torn")
    with pytest.raises(OSError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.EIO, "Input/output error")
    assert target.read_text() == "old" and _entries(tmp_path) == ["config.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and _entries(tmp_path) == ["config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
