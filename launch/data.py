"""Data: tokenizers, token streams, packing into fixed-length sequences, and a resumable,
deterministic batch iterator.

Sources:
- ``stdlib``: the Python standard library's own ``.py`` files on this machine (real text that
  is present everywhere, no download);
- ``files``: a file, folder or glob of text files;
- ``megatron``: a Megatron ``.bin``/``.idx`` corpus read through megatron-core;
- ``mqar``: synthetic multi-query associative recall whose keys and queries sit at opposite ends
  of the sequence, so a model solves it only if information crosses sequence shards.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.config import ConfigError, DataConfig

__all__ = [
    "Batch",
    "BatchIterator",
    "ByteTokenizer",
    "MQARDataset",
    "PackedDataset",
    "build_dataset",
    "load_tokenizer",
]

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; needs no files."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "data.tokenizer names a tokenizer.json but the 'tokenizers' package is missing: "
                "pip install 'linscale[tokenizers]'"
            ) from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises its own exception types
            raise ConfigError(f"data.tokenizer {path!r} could not be read: {e}") from None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    """``"byte"`` or the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise ConfigError(
            f"data.tokenizer must be 'byte' or an existing tokenizer.json, got {spec!r}"
        )
    return HFTokenizer(spec)


def stdlib_files(max_files: int) -> list[Path]:
    """The standard library's top-level ``.py`` files, then its packages', sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    files = [f for f in files if "site-packages" not in f.parts and "test" not in f.parts]
    return files[:max_files]


def user_files(spec: str, max_files: int) -> list[Path]:
    p = Path(spec)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise ConfigError(f"data.path {spec!r} matches no files")
    return files[:max_files]


def tokenize_files(files: list[Path], tokenizer) -> np.ndarray:
    """All files' tokens, concatenated with a newline between documents, as int32."""
    # One int32 array per document: a Python list of every token in the corpus would cost
    # ~30 bytes per token at start-up on every rank.
    sep = np.asarray(tokenizer.encode("\n\n"), dtype=np.int32)
    parts: list[np.ndarray] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts += [np.asarray(tokenizer.encode(text), dtype=np.int32), sep]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def megatron_tokens(prefix: str) -> np.ndarray:
    """Every document of a Megatron ``.bin``/``.idx`` corpus, concatenated."""
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise ConfigError(
                f"data.path: {prefix + ext!r} does not exist (give the prefix without .bin/.idx)"
            )
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise ConfigError(
            "data.source megatron needs megatron-core: pip install 'linscale[megatron]'"
        ) from None
    ds = IndexedDataset(prefix, mmap=True)
    return np.concatenate([np.asarray(ds[i], dtype=np.int32) for i in range(len(ds))])


@dataclass
class Batch:
    """``inputs``/``labels`` ``[B, T]`` int64; labels are ``IGNORE_INDEX`` where no target."""

    inputs: torch.Tensor
    labels: torch.Tensor


class PackedDataset:
    """A token stream cut into windows of ``seq_len + 1`` (inputs and next-token labels)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ConfigError(
                f"the corpus has {len(tokens)} tokens, fewer than training.seq_len "
                f"+ 1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = index * self.seq_len
        w = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class MQARDataset:
    """Multi-query associative recall with keys at the start and queries at the end.

    Layout of one sequence of length T: ``k1 v1 k2 v2 ... kP vP``, filler tokens, then the P
    keys again in a random order, each followed by its value. The loss is only on the values
    after the query keys, which sit ``~T`` tokens after their pair: under sequence parallelism
    the answer lives on another rank.

    Token ids: keys ``[0, V)``, values ``[V, 2V)``, filler ``2V``. The model's vocabulary must
    hold ``2V + 1`` ids.
    """

    def __init__(
        self, seq_len: int, *, pairs: int, vocab: int, seed: int, num_samples: int = 1 << 20
    ) -> None:
        if 4 * pairs > seq_len:
            raise ConfigError(
                f"data.mqar_pairs ({pairs}) needs training.seq_len >= {4 * pairs}, got {seq_len}"
            )
        if pairs > vocab:
            raise ConfigError(f"data.mqar_pairs ({pairs}) must be <= data.mqar_vocab ({vocab})")
        self.seq_len, self.pairs, self.vocab, self.seed = seq_len, pairs, vocab, seed
        self.num_samples = num_samples
        self.vocab_size = 2 * vocab + 1

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        P, V, T = self.pairs, self.vocab, self.seq_len
        keys = torch.randperm(V, generator=g)[:P]
        vals = torch.randint(V, 2 * V, (P,), generator=g)
        seq = torch.full((T + 1,), 2 * V, dtype=torch.int64)
        seq[0 : 2 * P : 2], seq[1 : 2 * P : 2] = keys, vals
        order = torch.randperm(P, generator=g)
        q0 = T + 1 - 2 * P
        seq[q0::2], seq[q0 + 1 :: 2] = keys[order], vals[order]
        inputs, labels = seq[:-1].clone(), seq[1:].clone()
        mask = torch.ones(T, dtype=torch.bool)
        mask[q0::2] = False  # predict the value right after each query key
        labels[mask] = IGNORE_INDEX
        return inputs, labels


def build_dataset(cfg: DataConfig, *, seq_len: int, seed: int, vocab_size: int):
    """The dataset a config asks for; checks that token ids fit ``vocab_size``."""
    if cfg.source == "mqar":
        ds = MQARDataset(seq_len, pairs=cfg.mqar_pairs, vocab=cfg.mqar_vocab, seed=seed)
        if ds.vocab_size > vocab_size:
            raise ConfigError(
                f"data.mqar_vocab = {cfg.mqar_vocab} needs model.vocab_size >= "
                f"{ds.vocab_size}, got {vocab_size}"
            )
        return ds
    if cfg.source == "megatron":
        tokens = megatron_tokens(cfg.path)
    else:
        tok = load_tokenizer(cfg.tokenizer)
        if tok.vocab_size > vocab_size:
            raise ConfigError(
                f"data.tokenizer has {tok.vocab_size} ids but model.vocab_size is {vocab_size}"
            )
        files = (
            stdlib_files(cfg.max_files)
            if cfg.source == "stdlib"
            else user_files(cfg.path, cfg.max_files)
        )
        tokens = tokenize_files(files, tok)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ConfigError(
            f"data: token id {int(tokens.max())} does not fit model.vocab_size {vocab_size}"
        )
    return PackedDataset(tokens, seq_len)


class BatchIterator:
    """Deterministic, resumable global batches, split over data-parallel ranks.

    Step ``s`` uses samples ``perm_e[(s * B) % N ...]`` of the epoch's permutation ``perm_e``
    (seeded by ``seed`` and the epoch), so the order depends only on the seed and the step; the
    whole state is the number of global batches already handed out.

    Args:
        dataset: has ``__len__`` and ``sample(i) -> (inputs [T], labels [T])``.
        global_batch: sequences per step over all dp ranks.
        dp_rank, dp_size: this rank's share is ``global_batch // dp_size`` sequences.
    """

    def __init__(
        self, dataset, *, global_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0
    ) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} not divisible by dp {dp_size}")
        self.dataset, self.global_batch = dataset, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.local_batch = global_batch // dp_size
        self.batches_done = 0
        self._perm_epoch, self._perm = -1, None

    def _index(self, flat: int) -> int:
        n = len(self.dataset)
        epoch, pos = divmod(flat, n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[pos])

    def next_batch(self) -> Batch:
        base = self.batches_done * self.global_batch + self.dp_rank * self.local_batch
        pairs = [self.dataset.sample(self._index(base + i)) for i in range(self.local_batch)]
        self.batches_done += 1
        return Batch(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    def state_dict(self) -> dict:
        return {
            "batches_done": self.batches_done,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError(
                f"the checkpoint was written with training.batch_size {state['global_batch']}, "
                f"this run uses {self.global_batch}; resume with the same batch size"
            )
        self.batches_done = int(state["batches_done"])
