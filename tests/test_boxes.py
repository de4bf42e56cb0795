"""Format 3's boxes, as pure arithmetic (checkpoint/layout.py): a grid rule gives every rank the box DTensor gives it,
the boxes tile the tensor exactly once, a read's runs are contiguous in both boxes, and the rule stays O(1) and
vectorised at 1,024 ranks."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from wsd_pretrain.errors import CheckpointError


def test_grid_boxes_are_dtensors_and_tile_the_tensor():
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as dtensor_box
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    from wsd_pretrain.checkpoint.layout import Grid, Partition

    cases = 0
    for rows, cols, dp, tp in itertools.product((0, 5, 8), (3,), (1, 2, 3), (2, 4)):
        layouts = {
            ((0,), (1,)): [Shard(0), Shard(1)],  # Rowwise under FSDP2: dim 0 by dp, dim 1 by tp
            ((), (0, 1)): [Shard(1), Shard(1)],  # both on one dim, in mesh order
            ((0,), ()): [Shard(0), Replicate()],  # replicated over tp: written by tp rank 0
        }
        if rows % (dp * tp) == 0:  # FSDP2 over Colwise: even pieces (uneven ones are refused: adapters.py)
            layouts[((1, 0), ())] = [_StridedShard(0, split_factor=tp), Shard(0)]
        for dims, placements in layouts.items():
            grid = Grid((rows, cols), (dp, tp), None, dims)
            seen = torch.zeros(rows, cols, dtype=torch.int64)
            for coord in itertools.product(range(dp), range(tp)):
                shape, offset = dtensor_box((rows, cols), (dp, tp), list(coord), placements)
                offsets, lengths = grid.box(coord)
                assert lengths == tuple(shape), (rows, cols, dp, tp, dims, coord)
                if math.prod(lengths):
                    assert offsets == tuple(offset), (rows, cols, dp, tp, dims, coord)
            part = Partition(grid=grid)
            for offsets, lengths, start, n, rank in part.iter_boxes((rows, cols)):
                assert start == 0 and n == math.prod(lengths)
                assert part.box_of(rank) == (offsets, lengths) and part.local(rank, rows * cols) == (0, n)
                seen[offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]] += 1
            assert bool((seen == 1).all()), f"boxes tile the tensor once: {dims} on ({dp}, {tp})"
            assert int(part.bytes_by_rank(rows * cols, dp * tp, 4).sum()) == rows * cols * 4
            cases += 1
    assert cases > 50


def test_runs_and_overlapping_boxes_read_each_element_once():
    from wsd_pretrain.checkpoint.layout import Grid, intersect, runs

    rng = random.Random(0)
    for _ in range(400):
        shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(0, 3)))
        full = torch.arange(max(1, math.prod(shape))).reshape(shape)

        def box(shape: tuple[int, ...] = shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
            lo = [rng.randrange(n) for n in shape]
            return tuple(lo), tuple(rng.randint(1, n - o) for o, n in zip(lo, shape))

        def sub(b: tuple[tuple[int, ...], tuple[int, ...]], full: torch.Tensor = full) -> torch.Tensor:
            return full[tuple(slice(o, o + n) for o, n in zip(*b))].reshape(-1)

        a, b = box(), box()
        common = intersect(a, b)
        if common is None:
            assert any(ao + al <= bo or bo + bl <= ao for ao, al, bo, bl in zip(a[0], a[1], b[0], b[1]))
            continue
        length, in_a, (in_b,) = runs(common, a, b)
        got_a = torch.cat([sub(a)[s : s + length] for s in in_a.tolist()])
        got_b = torch.cat([sub(b)[s : s + length] for s in in_b.tolist()])
        assert torch.equal(got_a, sub(common)) and torch.equal(got_b, sub(common))
        if a == b:
            assert len(in_a) == 1, "a box read from the same box is one run"
    # the neighbours a read touches, not every rank of the mesh
    grid = Grid((64, 8), (8, 4), None, ((1, 0), ()))
    assert len(list(grid.overlapping(((0, 0), (2, 8))))) == 1
    assert len(list(grid.overlapping(((0, 0), (64, 8))))) == 32


def test_a_grid_at_a_thousand_ranks_is_one_rule():
    from wsd_pretrain.checkpoint.layout import Grid, Item, Partition, plan_save

    # 70B-like: TP 8 x FSDP 128 on 1,024 ranks, a Colwise weight cut by tp then by dp inside each tp piece
    grid = Grid((28672, 8192), (128, 8), None, ((1, 0), ()))
    part = Partition(grid=grid)
    assert len(str(part.to_json())) < 100
    by_rank = part.bytes_by_rank(28672 * 8192, 1024, 2)
    assert int(by_rank.sum()) == 28672 * 8192 * 2 and int(by_rank.max()) == int(by_rank.min())
    plan = plan_save([Item("optimizer", "w/exp_avg", (28672, 8192), torch.float32, part)], 1024, 2**31)
    assert int(plan.files_per_holder.sum()) == 1024


def test_grid_json_is_checked():
    from wsd_pretrain.checkpoint.layout import Partition

    good = {"grid": {"mesh": [2, 2], "dims": [[1, 0], []]}}
    assert Partition.from_json(good, 32, "t", (8, 4)).grid.dims == ((1, 0), ())
    for bad, why in (
        ({"grid": {"mesh": [2, 0], "dims": [[0], []]}}, "sizes > 0"),
        ({"grid": {"mesh": [2, 2], "dims": [[0]]}}, "for each of the 2 dimensions"),
        ({"grid": {"mesh": [2, 2], "dims": [[0, 0], []]}}, "cuts the tensor twice"),
        ({"grid": {"mesh": [2, 2], "dims": [[2], []]}}, "for each of the 2 dimensions"),
        ({"grid": {"mesh": [2, 2], "dims": [[0], []], "ranks": [0, 1, 1, 3]}}, "a distinct rank"),
    ):
        with pytest.raises(CheckpointError, match=why):
            Partition.from_json(bad, 32, "t", (8, 4))
