"""The on-disk format in one process: safetensors files, headers, manifests, names, listing, plans."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from wsd_pretrain import CheckpointError
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint.adapters import TensorSpec
from wsd_pretrain.checkpoint.io import plan_shards
from wsd_pretrain.checkpoint.safetensors_io import SafetensorsReader, hash_file, read_header, write_safetensors

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b": torch.arange(7, dtype=torch.int64),
    "c.bf16": torch.randn(4, 2).to(torch.bfloat16),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "flag": torch.tensor([True, False]),
}


def test_written_files_read_back_with_safetensors_and_hash_as_reported(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    size, digest = write_safetensors(ours, TENSORS)
    save_file(TENSORS, str(theirs), metadata={"format": "pt"})
    loaded = load_file(str(ours))
    assert loaded.keys() == TENSORS.keys()
    for k, v in TENSORS.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    data = ours.read_bytes()  # xxh3_128 by default, as the xxhash package computes it (not our own hash_file)
    assert (size, digest) == (len(data), xxhash.xxh3_128_hexdigest(data))
    assert hash_file(ours) == (size, digest)
    # the same tensors, the same metadata: safetensors' own reader sees the same header
    assert read_header(ours).tensors.keys() == read_header(theirs).tensors.keys()


def test_writer_refuses_what_cannot_be_saved_and_never_overwrites(tmp_path):
    with pytest.raises(CheckpointError, match="not a tensor"):
        write_safetensors(tmp_path / "x.safetensors", {"a": 3})
    with pytest.raises(CheckpointError, match="reserved"):
        write_safetensors(tmp_path / "y.safetensors", {"__metadata__": torch.zeros(1)})
    write_safetensors(tmp_path / "z.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(FileExistsError):
        write_safetensors(tmp_path / "z.safetensors", {"a": torch.ones(1)})


def test_non_contiguous_and_sliced_tensors_are_written_by_value(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    write_safetensors(tmp_path / "t.safetensors", {"t": base.t(), "s": base[1:3, 2:4]})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["s"], base[1:3, 2:4])


def _raw_file(path, header: dict, data: bytes = b"", claimed: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "claimed", "message"),
    [
        ({}, b"", 10**12, "header claims"),
        ({}, b"", 500, "but the file has"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside"),
        ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs 8"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "data section has 8"),
        ({"a": "nope"}, b"", None, "must have exactly"),
        ({"__metadata__": {"k": 1}}, b"", None, "strings to strings"),
    ],
)
def test_hostile_headers_are_refused_before_reading(tmp_path, header, data, claimed, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, claimed)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_header(path)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="shorter than"):
        read_header(tmp_path / "short.safetensors")


def test_reader_reads_rows(tmp_path):
    write_safetensors(tmp_path / "r.safetensors", {"w": torch.arange(20.0).reshape(5, 4)})
    with SafetensorsReader(tmp_path / "r.safetensors") as r:
        assert torch.equal(r.get_rows("w", 1, 3), torch.arange(4.0, 12.0).reshape(2, 4))
        with pytest.raises(CheckpointError, match="no tensor"):
            r.get("missing")


def test_names():
    assert F.checkpoint_name(300, ["final", "post-decay"]) == "step-000000300-post-decay+final"
    assert F.parse_name("step-000000300-post-decay+final") == (300, ["post-decay", "final"])
    assert F.parse_name("step-12-periodic") is None and F.parse_name(".staging-step-000000001-periodic-ab") is None
    with pytest.raises(CheckpointError):
        F.checkpoint_name(1, ["sometimes"])
    assert F.shard_name("model", 1, 3) == "model-00001-of-00003.safetensors"


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x", "a/../../x", "a\\b", "", "a//b", "./a", 7])
def test_safe_path_refuses_escapes(tmp_path, rel):
    with pytest.raises(CheckpointError):
        F.safe_path(tmp_path, rel, "test")


def test_safe_path_refuses_symlinks(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(CheckpointError, match="symbolic link"):
        F.safe_path(tmp_path / "ckpt", "link/file", "test")
    assert F.safe_path(tmp_path / "ckpt", "train_state/x.json", "test") == tmp_path / "ckpt/train_state/x.json"


def test_plan_shards_caps_sizes_and_balances_owners():
    specs = [TensorSpec("model", f"w{i}", (100,), torch.float32) for i in range(10)]  # 400 bytes each
    specs += [TensorSpec("optimizer", f"w{i}/exp_avg", (100,), torch.float32) for i in range(10)]
    specs += [TensorSpec("model", "huge", (1000,), torch.float32)]
    shards = plan_shards(specs, max_shard_bytes=1000, world_size=3, rank0_only=False)
    assert all(s.nbytes <= 1000 or len(s.specs) == 1 for s in shards)
    assert [s.relpath for s in shards if s.group == "model"][0] == "model-00001-of-00006.safetensors"
    assert [s.relpath for s in shards if s.group == "optimizer"][
        0
    ] == "train_state/optimizer-00001-of-00005.safetensors"
    assert sorted({s.owner for s in shards}) == [0, 1, 2]
    loads = [sum(s.nbytes for s in shards if s.owner == r) for r in range(3)]
    assert max(loads) - min(loads) <= 4000
    assert {s.owner for s in plan_shards(specs, 1000, 3, rank0_only=True)} == {0}
    # every rank computes the same plan
    again = plan_shards(specs, 1000, 3, rank0_only=False)
    assert [(s.relpath, s.owner) for s in again] == [(s.relpath, s.owner) for s in shards]


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256"])
def test_both_checksums_are_written_and_verified(tmp_path, algo):
    import hashlib

    size, digest = write_safetensors(tmp_path / "c.safetensors", TENSORS, checksum=algo)
    data = (tmp_path / "c.safetensors").read_bytes()
    reference = hashlib.sha256(data).hexdigest() if algo == "sha256" else xxhash.xxh3_128_hexdigest(data)
    assert (size, digest) == (len(data), reference)
    assert hash_file(tmp_path / "c.safetensors", algo) == (size, digest)
    with pytest.raises(CheckpointError, match="checksum 'md5'"):
        write_safetensors(tmp_path / "d.safetensors", TENSORS, checksum="md5")
