"""Tokenizers, corpora, packing, MQAR, and deterministic, resumable batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.config import ConfigError, DataConfig
from launch.data import (
    IGNORE_INDEX,
    BatchIterator,
    ByteTokenizer,
    MQARDataset,
    PackedDataset,
    build_dataset,
    load_tokenizer,
    stdlib_files,
)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # é ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256


def test_hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "def": 1, "return": 2, "x": 3}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == 4
    assert tok.encode("def x return y") == [1, 3, 2, 0]


def test_bad_tokenizer_path():
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer("/no/such/tokenizer.json")


def test_stdlib_corpus_is_real_and_deterministic():
    files = stdlib_files(20)
    assert len(files) == 20 and files == stdlib_files(20)
    ds = build_dataset(DataConfig(max_files=20), seq_len=128, seed=0, vocab_size=256)
    x, y = ds.sample(3)
    assert x.shape == y.shape == (128,)
    torch.testing.assert_close(x[1:], y[:-1])
    assert b"import" in bytes(ds.tokens[:200000].astype(np.uint8))


def test_vocab_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_dataset(DataConfig(max_files=2), seq_len=64, seed=0, vocab_size=100)


def test_corpus_shorter_than_a_sequence():
    with pytest.raises(ConfigError, match="training.seq_len"):
        PackedDataset(np.arange(10, dtype=np.int32), 64)


def test_batches_deterministic_resumable_and_split_over_dp():
    ds = PackedDataset(np.arange(100 * 16 + 1, dtype=np.int32), 16)
    a = BatchIterator(ds, global_batch=4, seed=3)
    full = [a.next_batch().inputs for _ in range(60)]  # crosses an epoch boundary (100 samples)
    b = BatchIterator(ds, global_batch=4, seed=3)
    for _ in range(10):
        b.next_batch()
    state = b.state_dict()
    c = BatchIterator(ds, global_batch=4, seed=3)
    c.load_state_dict(state)
    for i in range(10, 60):
        torch.testing.assert_close(c.next_batch().inputs, full[i])
    # dp ranks take disjoint halves of the same global batch.
    r0 = BatchIterator(ds, global_batch=4, dp_rank=0, dp_size=2, seed=3).next_batch().inputs
    r1 = BatchIterator(ds, global_batch=4, dp_rank=1, dp_size=2, seed=3).next_batch().inputs
    torch.testing.assert_close(torch.cat([r0, r1]), full[0])
    # a different seed gives a different order
    d = BatchIterator(ds, global_batch=4, seed=4).next_batch().inputs
    assert not torch.equal(d, full[0])
    # every sample is seen once per epoch
    seen = torch.cat(full[:25])[:, 0].tolist()
    assert len(set(seen)) == 100


def test_resume_with_other_batch_size_is_refused():
    ds = PackedDataset(np.arange(1000, dtype=np.int32) % 256, 16)
    a = BatchIterator(ds, global_batch=4)
    b = BatchIterator(ds, global_batch=8)
    with pytest.raises(ConfigError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_mqar_answers_live_far_from_their_keys():
    ds = MQARDataset(128, pairs=8, vocab=32, seed=0)
    x, y = ds.sample(5)
    assert int(x.max()) < ds.vocab_size
    keys, vals = x[0:16:2], x[1:16:2]
    pairs = dict(zip(keys.tolist(), vals.tolist()))
    targets = (y != IGNORE_INDEX).nonzero().flatten()
    assert len(targets) == 8
    for t in targets.tolist():
        assert t >= 128 - 16  # the queries sit at the end of the sequence
        assert pairs[int(x[t])] == int(y[t])  # the label is the value paired with that key
    x2, _ = ds.sample(5)
    torch.testing.assert_close(x, x2)


def test_megatron_corpus(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = [np.arange(i, i + 50, dtype=np.int32) % 200 for i in range(5)]
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")
    ds = build_dataset(
        DataConfig(source="megatron", path=prefix), seq_len=32, seed=0, vocab_size=256
    )
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(
            DataConfig(source="megatron", path=prefix + "x"), seq_len=32, seed=0, vocab_size=256
        )
