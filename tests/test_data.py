"""Data: sources, the held-out split, and the sampler's resumable, world-size independent position."""

from __future__ import annotations

import numpy as np
import pytest

from wsd_pretrain import ConfigError
from wsd_pretrain.data import DataConfig, ShardedSampler, TokenData


def test_stdlib_corpus_and_split():
    data = TokenData(DataConfig(max_bytes=2_000_000, seq_len=64))
    assert data.min_vocab == 256 and data.num_train > 0 and data.num_valid > 0
    assert set(data.train_starts).isdisjoint(data.valid_starts)
    assert 0.01 < data.num_valid / (data.num_train + data.num_valid) < 0.03
    span = data.valid_starts.max() - data.valid_starts.min()
    assert span > 0.5 * len(data.tokens), "held-out blocks are spread over the stream, not only its tail"
    x, y = data.train_batch([0, 1])
    assert x.shape == (2, 64) and (x[:, 1:] == y[:, :-1]).all()


def test_token_files_are_memory_mapped(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16) % 5000
    tokens.tofile(tmp_path / "a.bin")
    tokens[::-1].copy().tofile(tmp_path / "b.bin")
    data = TokenData(DataConfig(source="tokens", paths=(str(tmp_path / "*.bin"),), seq_len=32, valid_fraction=0.1))
    assert data.min_vocab == 5000
    x, _ = data.train_batch([0])
    assert x[0, :3].tolist() == [0, 1, 2]
    (tmp_path / "odd.bin").write_bytes(b"\0" * 3)
    with pytest.raises(ConfigError, match="not a whole number"):
        TokenData(DataConfig(source="tokens", paths=(str(tmp_path / "odd.bin"),)))
    with pytest.raises(ConfigError, match="matches no file"):
        TokenData(DataConfig(source="text", paths=(str(tmp_path / "none*.txt"),)))


def _draw(sampler: ShardedSampler, steps: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(steps)]


def test_sampler_shards_ranks_and_covers_each_epoch_once():
    n, micro, world = 50, 3, 2
    ranks = [ShardedSampler(n, micro, r, world, seed=1, shuffle=True) for r in range(world)]
    seen = []
    for _ in range(8):  # 8 * 3 * 2 = 48 samples of the first epoch
        for s in ranks:
            seen += s.next_indices()
    assert len(seen) == len(set(seen)) == 48
    assert ranks[0].epoch == 0 and ranks[0].samples_seen == 48


def test_sampler_resumes_exactly_and_on_another_world_size():
    a = ShardedSampler(100, 4, 0, 2, seed=7, shuffle=True)
    _draw(a, 5)
    state = a.state_dict()
    b = ShardedSampler(100, 4, 0, 2, seed=7, shuffle=True)
    b.load_state_dict(state)
    assert _draw(a, 30) == _draw(b, 30), "same world size: the same sequence, across epoch boundaries"
    # on 4 ranks, the global stream continues from the same global sample
    one = ShardedSampler(100, 4, 0, 1, seed=7, shuffle=True)
    one.load_state_dict(state)
    four = [ShardedSampler(100, 1, r, 4, seed=7, shuffle=True) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    assert one.next_indices() == [s.next_indices()[0] for s in four]
    with pytest.raises(ConfigError, match="same data"):
        ShardedSampler(99, 4, 0, 2, seed=7, shuffle=True).load_state_dict(state)
