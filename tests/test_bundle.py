"""Bundles: bit-identical creation, streaming sha256, and extraction that refuses hostile tars."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from trainfleet import bundle
from trainfleet.errors import BadRequest

COMPRESSIONS = [
    "gzip",
    pytest.param(
        "zstd",
        marks=pytest.mark.skipif(not bundle.zstd_available(), reason="zstandard not installed"),
    ),
]

FILES = {
    "model.bin": bytes(range(256)) * 64,
    "metrics.json": b'{"auc": 0.91}\n',
    "sub/deeper/weights.npy": b"\x00" * 5000,
    "sub/empty.txt": b"",
    "b_before_sub.txt": b"sorted by path, not by creation order",
}


def write_tree(root: Path, files: dict[str, bytes], *, reverse: bool, mtime: int) -> Path:
    """A source directory, its files created in the given order and stamped with `mtime`."""
    root.mkdir()
    (root / "empty_dir").mkdir()
    for name in sorted(files, reverse=reverse):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime))
    return root


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories)."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in root.rglob("*")
    }


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_bundles_are_bit_identical_across_mtimes_and_creation_order(
    tmp_path: Path, compression: str
) -> None:
    first = write_tree(tmp_path / "a", FILES, reverse=False, mtime=1_000_000)
    second = write_tree(tmp_path / "b", FILES, reverse=True, mtime=1_700_000_000)
    one = bundle.create(first, tmp_path / "one.tar", compression=compression)
    two = bundle.create(second, tmp_path / "elsewhere.bundle", compression=compression)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.artifact_id == two.artifact_id == hashlib.sha256(one.path.read_bytes()).hexdigest()
    assert one.size == one.path.stat().st_size
    assert one.compression == compression == bundle.detect_compression(one.path)


def test_different_content_gives_a_different_artifact_id(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    one = bundle.create(src, tmp_path / "one", compression="gzip")
    (src / "metrics.json").write_bytes(b'{"auc": 0.92}\n')
    assert bundle.create(src, tmp_path / "two", compression="gzip").artifact_id != one.artifact_id


def test_members_are_sorted_with_owners_times_and_modes_normalised(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=True, mtime=1_234_567)
    (src / "model.bin").chmod(0o600)
    made = bundle.create(src, tmp_path / "b.tar.gz", compression="gzip")
    with tarfile.open(made.path, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {m.mtime for m in members} == {0}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["run.sh"] == 0o755 and modes["model.bin"] == 0o644
    assert modes["sub"] == modes["empty_dir"] == 0o755


def test_gzip_header_has_no_time_and_no_filename(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    header = bundle.create(src, tmp_path / "named.tar.gz", compression="gzip").path.read_bytes()
    flags, mtime = header[3], header[4:8]
    assert flags & 0x08 == 0  # FNAME
    assert mtime == b"\x00\x00\x00\x00"


def test_default_compression_is_zstd_when_available(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    made = bundle.create(src, tmp_path / "out")
    assert made.compression == ("zstd" if bundle.zstd_available() else "gzip")


def test_symlink_in_source_is_refused_by_name(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    (src / "sub" / "link").symlink_to(src / "model.bin")
    with pytest.raises(ValueError, match="link"):
        bundle.create(src, tmp_path / "out.tar.gz", compression="gzip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dest, no temp


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    with pytest.raises(ValueError, match="compression"):
        bundle.create(src, tmp_path / "out", compression="bzip2")


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert bundle.sha256_file(path) == expected
    assert bundle.sha256_file(path, chunk_size=7) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert bundle.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_detect_compression_by_magic_bytes(tmp_path: Path) -> None:
    (tmp_path / "g").write_bytes(gzip.compress(b"x"))
    (tmp_path / "z").write_bytes(b"\x28\xb5\x2f\xfd rest")
    (tmp_path / "t").write_bytes(b"plain tar")
    assert bundle.detect_compression(tmp_path / "g") == "gzip"
    assert bundle.detect_compression(tmp_path / "z") == "zstd"
    with pytest.raises(BadRequest, match="not a zstd or gzip"):
        bundle.detect_compression(tmp_path / "t")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_extract_round_trips_content_and_modes(tmp_path: Path, compression: str) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    made = bundle.create(src, tmp_path / "b", compression=compression)
    out = tmp_path / "out"
    written = bundle.extract(made.path, out)
    assert tree_of(out) == tree_of(src)
    assert sorted(written) == sorted(out / name for name in tree_of(src))
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "model.bin").stat().st_mode & 0o777 == 0o644


def test_extract_into_an_existing_empty_directory(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    made = bundle.create(src, tmp_path / "b", compression="gzip")
    (tmp_path / "out").mkdir()
    bundle.extract(made.path, tmp_path / "out")
    assert tree_of(tmp_path / "out") == tree_of(src)


def test_extract_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    made = bundle.create(src, tmp_path / "b", compression="gzip")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        bundle.extract(made.path, tmp_path / "out")
    assert tree_of(tmp_path / "out") == {"keep.txt": b"mine"}


# --- hostile tars -----------------------------------------------------------


def member(name: str, data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def hostile_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A gzip tar holding one harmless file first, so partial output would show."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in [member("ok.txt", b"fine"), *members]:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


HOSTILE = {
    "dotdot": ([member("../escape", b"x")], {}, "../escape"),
    "nested_dotdot": ([member("sub/../../escape", b"x")], {}, "escape"),
    "windows_dotdot": ([member("sub\\..\\..\\escape", b"x")], {}, "escape"),
    "absolute": ([member("/abs", b"x")], {}, "/abs"),
    "drive_letter": ([member("C:/abs", b"x")], {}, "C:/abs"),
    "symlink": ([member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd")], {}, "link"),
    "hardlink": ([member("hard", type=tarfile.LNKTYPE, linkname="ok.txt")], {}, "hard"),
    "char_device": (
        [member("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
        {},
        "null",
    ),
    "fifo": ([member("pipe", type=tarfile.FIFOTYPE)], {}, "pipe"),
    "too_many_members": (
        [member(f"f{i}", b"x") for i in range(3)],
        {"max_members": 3},
        "f2",
    ),
    "size_cap": ([member("big", b"y" * 20)], {"max_bytes": 15}, "big"),
    "duplicate": ([member("ok.txt", b"again")], {}, "ok.txt"),
    "under_a_file": ([member("ok.txt/inner", b"x")], {}, "ok.txt/inner"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_extract_refuses_hostile_members_and_writes_nothing(tmp_path: Path, case: str) -> None:
    members, caps, named = HOSTILE[case]
    evil = hostile_tar(tmp_path / "evil.tar.gz", members)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(BadRequest, match=named.replace("\\", "\\\\")):
        bundle.extract(evil, parent / "out", **caps)
    assert list(parent.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "parent"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("damage", ["truncated", "flipped_byte"])
def test_extract_refuses_corrupt_data(tmp_path: Path, compression: str, damage: str) -> None:
    src = write_tree(tmp_path / "src", FILES, reverse=False, mtime=0)
    data = bytearray(bundle.create(src, tmp_path / "b", compression=compression).path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(BadRequest):
        bundle.extract(tmp_path / "bad", tmp_path / "parent" / "out")
    assert list((tmp_path / "parent").iterdir()) == []


def test_extract_caps_decompressed_size_even_without_member_data(tmp_path: Path) -> None:
    """A bomb made of headers (a huge long name) is stopped by the stream cap."""
    long_name = "n" * 200_000
    evil = hostile_tar(tmp_path / "evil.tar.gz", [member(long_name, b"x")])
    with pytest.raises(BadRequest, match="size cap"):
        bundle.extract(evil, tmp_path / "out", max_members=2, max_bytes=10)
    assert not (tmp_path / "out").exists()
