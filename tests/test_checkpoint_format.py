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
from wsd_pretrain.checkpoint.layout import Item, Partition, fsdp_rows, plan_save, zero3_chunks, zero12_fragments
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


def test_plan_caps_model_shards_and_balances_writers():
    items = [Item("model", f"w{i}", (100,), torch.float32) for i in range(10)]  # 400 bytes each
    items += [Item("model", "huge", (1000,), torch.float32)]
    items += [Item("optimizer", f"w{i}/exp_avg", (100,), torch.float32) for i in range(10)]  # replicated (DDP)
    plan = plan_save(items, world=3, max_shard_bytes=1000)
    assert [s.relpath for s in plan.model_shards][0] == "model-00001-of-00006.safetensors"
    assert all(s.nbytes <= 1000 or len(s.items) == 1 for s in plan.model_shards)
    # every replicated optimizer tensor is written once, by one rank; the writers are balanced by bytes
    files = [f for r in range(3) for f in plan.state_files(r)]
    written = sorted(item.name for f in files for item, _, _ in f.entries)
    assert written == sorted(f"w{i}/exp_avg" for i in range(10))
    assert sorted({s.owner for s in plan.model_shards}) == [0, 1, 2]
    assert max(plan.bytes_per_rank) - min(plan.bytes_per_rank) <= 4000
    assert [len(plan.state_files(r)) for r in range(3)] == list(plan.files_per_holder)
    # every rank computes the same plan
    again = plan_save(items, world=3, max_shard_bytes=1000)
    assert [(s.relpath, s.owner) for s in again.model_shards] == [(s.relpath, s.owner) for s in plan.model_shards]


def test_weights_travel_in_windows_that_feed_every_writer_at_once(monkeypatch):
    from wsd_pretrain.checkpoint import save

    monkeypatch.setattr(save, "GATHER_WINDOW_BYTES", 1000)
    # FSDP2-like weights (sharded: they travel) of 400 bytes, one of 4000, and a replicated bias (does not travel)
    items = [Item("model", f"w{i}", (4, 25), torch.float32, fsdp_rows((4, 25), 4)) for i in range(12)]
    items += [Item("model", "huge", (40, 25), torch.float32, fsdp_rows((40, 25), 4))]
    items += [Item("model", "bias", (25,), torch.float32)]
    plan = plan_save(items, world=4, max_shard_bytes=1200)
    queues = {}
    for shard in plan.model_shards:
        queues.setdefault(shard.owner, []).extend((shard, item) for item in shard.items)
    windows = save._windows(queues, gathers=True)
    assert len({w for w, _, _ in windows[0]}) == len(queues) > 1, "the first window feeds every writer"
    for window in windows:
        for writer in queues:
            travelling = [i.nbytes for w, _, i in window if w == writer and not i.partition.replicated]
            assert sum(travelling) <= 1000 or len(travelling) == 1, "a window is capped per writer (one huge alone)"
    for writer, queue in queues.items():  # each writer gets its items once, in its files' order
        assert [i.name for window in windows for w, _, i in window if w == writer] == [i.name for _, i in queue]
    # a converter's items (nothing travels) all go in one window
    assert len(save._windows(queues, gathers=False)) == 1


def test_each_rank_writes_the_slices_it_holds():
    # ZeRO-3: 10 elements over 4 ranks -> 3, 3, 3, 1; FSDP2 rows: 5 rows of 2 over 4 ranks -> 2, 2, 1, 0 rows
    z3 = Item("optimizer", "w/exp_avg", (10,), torch.float32, zero3_chunks(10, 4))
    fs = Item("optimizer", "v/exp_avg", (5, 2), torch.float32, fsdp_rows((5, 2), 4))
    (frag,) = zero12_fragments([6], [5], partition_size=4, world=4)  # elements 5..10 of a flat of 16 -> ranks 1, 2
    zf = Item("master", "u", (6,), torch.float32, frag)
    plan = plan_save([z3, fs, zf], world=4, max_shard_bytes=10**6)
    held = {r: [(i.key, s, n) for f in plan.state_files(r) for i, s, n in f.entries] for r in range(4)}
    assert held[0] == [("optimizer/w/exp_avg", 0, 3), ("optimizer/v/exp_avg", 0, 4)]
    assert held[1] == [("optimizer/w/exp_avg", 3, 3), ("optimizer/v/exp_avg", 4, 4), ("master/u", 0, 3)]
    assert held[2] == [("optimizer/w/exp_avg", 6, 3), ("optimizer/v/exp_avg", 8, 2), ("master/u", 3, 3)]
    assert held[3] == [("optimizer/w/exp_avg", 9, 1)]
    assert list(plan.files_per_holder) == [1, 1, 1, 1]
    assert list(plan.bytes_per_rank) == [28, 40, 32, 4]
    # a partition read back from an index must tile the tensor exactly
    assert Partition.from_json({"parts": [[0, 3, 1], [3, 3, 2]]}, 6, "t") == frag
    with pytest.raises(CheckpointError, match="gap or overlap"):
        Partition.from_json({"parts": [[0, 3, 1], [4, 2, 2]]}, 6, "t")
    with pytest.raises(CheckpointError, match="cover 5 elements of 6"):
        Partition.from_json({"parts": [[0, 3, 1], [3, 2, 2]]}, 6, "t")


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
