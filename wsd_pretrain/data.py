"""Training data: a token stream cut into fixed-length sequences, and a resumable, rank-sharded sampler.

Sources (the ``data:`` section):

* ``stdlib`` (default): the Python standard library's ``.py`` files, byte-level: every machine has them, no download;
* ``text``: text files (paths or globs), byte-level;
* ``tokens``: pre-tokenized files of ``uint16`` or ``uint32`` token ids, memory-mapped (nanoGPT's ``train.bin``,
  or a Megatron-style flat ``.bin`` of one dtype).

A ``valid_fraction`` of the sequences, in blocks spread over the whole stream, is held out for validation. The sampler's position is a count of global
samples, so a checkpoint written on 4 ranks resumes on 2 at the same place in the data.
"""

from __future__ import annotations

import glob
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger("wsd_pretrain")

__all__ = ["DataConfig", "PhasedSampler", "ShardedSampler", "TokenData", "load_tokens"]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The ``data:`` section."""

    source: Literal["stdlib", "text", "tokens"] = "stdlib"
    """Where the tokens come from (see the module docstring)."""
    paths: tuple[str, ...] = ()
    """Files or glob patterns for ``text`` and ``tokens``."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of ``tokens`` files."""
    seq_len: int = 128
    """Tokens per training sequence (each sample reads seq_len + 1 tokens: inputs and shifted targets)."""
    valid_fraction: float = 0.02
    """Share of the sequences held out for validation (blocks spread over the stream)."""
    max_bytes: int | None = 8_000_000
    """Cap on the bytes read for ``stdlib`` and ``text`` (null: no cap)."""
    shuffle: bool = True
    """Visit the sequences in a seeded random order, a new one each epoch."""
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = []
        if self.source not in ("stdlib", "text", "tokens"):
            problems.append(f"source={self.source!r}: 'stdlib', 'text' or 'tokens'")
        if self.source in ("text", "tokens") and not self.paths:
            problems.append(f"source={self.source!r} needs paths (files or glob patterns)")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            problems.append(f"seq_len={self.seq_len!r}: a whole number >= 2")
        if not (isinstance(self.valid_fraction, (int, float)) and 0 <= self.valid_fraction < 0.5):
            problems.append(f"valid_fraction={self.valid_fraction!r}: in [0, 0.5)")
        if self.token_dtype not in ("uint16", "uint32"):
            problems.append(f"token_dtype={self.token_dtype!r}: 'uint16' or 'uint32'")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            problems.append(f"max_bytes={self.max_bytes!r}: a whole number > 0, or null")
        if problems:
            raise ConfigError(problems, where="data config")


def describe(cfg: DataConfig, num_sequences: int) -> dict[str, Any]:
    """What a checkpoint records of the data a phase read (plain JSON)."""
    return {
        "source": cfg.source,
        "paths": list(cfg.paths),
        "token_dtype": cfg.token_dtype if cfg.source == "tokens" else None,
        "seq_len": cfg.seq_len,
        "max_bytes": cfg.max_bytes if cfg.source != "tokens" else None,
        "valid_fraction": cfg.valid_fraction,
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "num_sequences": num_sequences,
    }


def _expand(patterns: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ConfigError(f"paths: {pattern!r} matches no file", where="data config")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def stdlib_files() -> list[Path]:
    """The standard library's Python sources in a fixed order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _read_bytes(files: list[Path], cap: int | None) -> np.ndarray:
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if cap is not None and total + len(data) > cap:
            data = data[: cap - total]
        chunks.append(np.frombuffer(data, dtype=np.uint8))
        chunks.append(np.frombuffer(b"\n", dtype=np.uint8))
        total += len(data) + 1
        if cap is not None and total >= cap:
            break
    if not chunks:
        raise ConfigError("no readable bytes in the data files", where="data config")
    return np.concatenate(chunks)


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, int]:
    """The whole token stream (a memory map for token files) and the vocabulary it needs at least."""
    if cfg.source == "stdlib":
        return _read_bytes(stdlib_files(), cfg.max_bytes), 256
    if cfg.source == "text":
        return _read_bytes(_expand(cfg.paths), cfg.max_bytes), 256
    dtype = np.dtype(cfg.token_dtype)
    arrays = []
    for path in _expand(cfg.paths):
        size = path.stat().st_size
        if size == 0:
            raise ConfigError(
                f"{path} is empty (0 bytes): no tokens to read; remove it from data.paths or write the tokens again",
                where="data config",
            )
        if size % dtype.itemsize:
            raise ConfigError(
                f"{path}: {size} bytes is not a whole number of {cfg.token_dtype} tokens", where="data config"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    vocab = int(tokens.max()) + 1 if len(tokens) else 0
    return tokens, vocab


class TokenData:
    """Train and validation sequences over one token stream.

    The stream is cut into sequences of ``seq_len + 1`` tokens at a stride of ``seq_len``; sequences come in blocks
    of 64, and every ``round(1 / valid_fraction)``-th block is held out, so validation data is spread over the
    whole stream (every file of the corpus) rather than its tail.
    """

    BLOCK = 64

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.tokens, self.min_vocab = load_tokens(cfg)
        count = (len(self.tokens) - 1) // cfg.seq_len
        starts = np.arange(count, dtype=np.int64) * cfg.seq_len
        if cfg.valid_fraction > 0:
            period = max(2, round(1 / cfg.valid_fraction))
            held = (np.arange(count) // self.BLOCK) % period == period - 1
        else:
            held = np.zeros(count, dtype=bool)
        self.train_starts, self.valid_starts = starts[~held], starts[held]
        self.num_train, self.num_valid = len(self.train_starts), len(self.valid_starts)
        if self.num_train < 1:
            raise ConfigError(
                f"{len(self.tokens)} tokens cannot fill one training sequence of seq_len={cfg.seq_len}+1",
                where="data config",
            )

    def _batch(self, starts: np.ndarray, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.cfg.seq_len
        rows = np.stack([np.asarray(self.tokens[s : s + length + 1], dtype=np.int64) for s in starts[indices]])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def train_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.train_starts, indices)

    def valid_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.valid_starts, indices)


class ShardedSampler:
    """Which sequences each rank reads next; its state (global samples seen) resumes on any world size.

    Global sample ``g`` is sequence ``order_e[g mod N]`` of epoch ``e = g // N``, where ``order_e`` is a permutation
    seeded by ``(seed, e)``. Each micro-step takes the next ``micro_batch x world`` global samples; rank ``r``
    reads the ``r``-th block of ``micro_batch`` of them.
    """

    def __init__(
        self, num_sequences: int, micro_batch: int, rank: int, world: int, *, seed: int, shuffle: bool
    ) -> None:
        if micro_batch < 1:
            raise ConfigError(f"micro batch {micro_batch}: must be >= 1", where="sampler")
        self.n, self.micro, self.rank, self.world = num_sequences, micro_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.samples_seen = 0
        self._epoch = -1
        self._order: np.ndarray | None = None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n, generator=g).numpy()
            else:
                self._order = np.arange(self.n)
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's sequence indices for the next micro-step (and advance the global position)."""
        start = self.samples_seen + self.rank * self.micro
        out = []
        for g in range(start, start + self.micro):
            out.append(int(self._order_of(g // self.n)[g % self.n]))
        self.samples_seen += self.micro * self.world
        return out

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "num_sequences": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_sequences") != self.n or state.get("seed") != self.seed:
            raise ConfigError(
                f"the checkpoint's data had {state.get('num_sequences')} sequences (seed {state.get('seed')}), this "
                f"run has {self.n} (seed {self.seed}): resume with the same data and data.seed",
                where="data",
            )
        self.samples_seen = int(state["samples_seen"])


class PhasedSampler:
    """The main job's data position: the ``data:`` sampler, and the ``decay_data:`` one when the decays read other
    data (docs/training.md, "Data for the decay").

    The trainer calls :meth:`use` before each update ("decay" inside a decay, else "main"). The decay data is read
    from its own sampler, which starts at the beginning of that data (its own seeded order) at the first decay and
    goes on from where the previous decay left it; the main sampler does not move during a decay. The state holds
    both positions and a description of the data each phase read; loading it back refuses other data unless that
    is allowed: ``allow_data_change`` (the user's flag: every changed source starts at its beginning) or
    ``new_decay_data`` (a cooldown or continuation: a decay source other than the checkpoint's starts at its
    beginning).
    """

    def __init__(
        self,
        main: ShardedSampler,
        main_data: dict[str, Any],
        decay: ShardedSampler | None = None,
        decay_data: dict[str, Any] | None = None,
    ) -> None:
        self.main, self.main_data = main, main_data
        self.decay, self.decay_data = decay, decay_data
        self.active = "main"
        self.allow_data_change = False
        self.new_decay_data = False

    def use(self, which: str) -> str:
        """Read the next batches from ``which`` ("decay" or "main"; "decay" without decay data is "main")."""
        self.active = "decay" if which == "decay" and self.decay is not None else "main"
        return self.active

    def next_indices(self) -> list[int]:
        return (self.decay if self.active == "decay" and self.decay is not None else self.main).next_indices()

    def state_dict(self) -> dict[str, Any]:
        state = {**self.main.state_dict(), "data": self.main_data}  # the main position at the top: older readers
        state["decay"] = None if self.decay is None else {**self.decay.state_dict(), "data": self.decay_data}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        flag = "--allow-data-change (the changed data starts at its beginning)"
        saved_main = state.get("data")
        same_main = state.get("num_sequences") == self.main.n and state.get("seed") == self.main.seed
        if saved_main is not None:
            same_main = same_main and _same_data(saved_main, self.main_data)
        if same_main:
            self.main.load_state_dict(state)
        elif self.allow_data_change:
            self.main.samples_seen = 0
            log.warning(
                "data: the checkpoint read %s, this run reads %s: starting it at its beginning (--allow-data-change)",
                _short(saved_main, state),
                _short(self.main_data, None),
            )
        else:
            raise ConfigError(
                f"the checkpoint's data was {_short(saved_main, state)}, this run's is {_short(self.main_data, None)}:"
                " resume with the same data: section. To read other data in the decays (a cooldown's, a "
                "continuation's, this run's own), put it in a decay_data: section; to change the training data on "
                f"purpose, run with {flag}",
                where="data",
            )
        saved_decay = state.get("decay")
        if self.decay is None:
            if saved_decay is not None and not (self.allow_data_change or self.new_decay_data):
                raise ConfigError(
                    f"the checkpoint's decays read {_short(saved_decay.get('data'), saved_decay)} (a decay_data: "
                    f"section) and this run has none: resume with the same decay_data: section, or run with {flag}",
                    where="data",
                )
            return
        if saved_decay is None:
            # the checkpoint's run had no decay data: a new run (cooldown, continuation) starts it at its beginning;
            # a plain resume that adds it changes the data the rest of the run reads
            if not (self.allow_data_change or self.new_decay_data):
                raise ConfigError(
                    f"the checkpoint's run had no decay_data: section, this run's is {_short(self.decay_data, None)}: "
                    f"resume without it, or run with {flag}",
                    where="data",
                )
            self.decay.samples_seen = 0
            return
        if _same_data(saved_decay.get("data") or {}, self.decay_data or {}):
            self.decay.load_state_dict(saved_decay)
        elif self.allow_data_change or self.new_decay_data:
            self.decay.samples_seen = 0
            log.info(
                "decay data: %s (the checkpoint's decays read %s), starting at its beginning",
                _short(self.decay_data, None),
                _short(saved_decay.get("data"), saved_decay),
            )
        else:
            raise ConfigError(
                f"the checkpoint's decays read {_short(saved_decay.get('data'), saved_decay)}, this run's "
                f"decay_data: is {_short(self.decay_data, None)}: resume with the same decay_data: section, or run "
                f"with {flag}",
                where="data",
            )


def _same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a == b


def _short(desc: dict[str, Any] | None, state: dict[str, Any] | None) -> str:
    if desc is None:
        state = state or {}
        return f"{state.get('num_sequences')} sequences (seed {state.get('seed')})"
    where = f" {desc['paths']}" if desc.get("paths") else ""
    return f"{desc.get('source')}{where}: {desc.get('num_sequences')} sequences (seed {desc.get('seed')})"
