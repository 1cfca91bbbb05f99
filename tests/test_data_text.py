"""Tokenizers, span corruption and the embedded corpus (and packed vs unpacked loss)."""

import os

import numpy as np
import pytest

from trainer.data import BOS_ID, EOS_ID, NUM_RESERVED, PAD_ID, UNK_ID, DataConfig, build_pipeline, load_tokenizer
from trainer.data import span_corruption as sc
from trainer.data.vocab import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

NON_ASCII = "Grüße aus Köln — naïve café, 東京タワー, Ελληνικά, emoji 🚀, math ∑x², tab\tend"

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagt das Lied.",
    "Le café est très chaud ce matin; la naïveté n'est pas un défaut.",
    "東京は日本の首都です。京都は古い都です。",
    "Η γλώσσα είναι ελληνική και όμορφη.",
    "    indented code line with spaces\nand a second line",
] * 20


def test_reserved_ids():
    assert (PAD_ID, EOS_ID, UNK_ID, BOS_ID, NUM_RESERVED) == (0, 1, 2, 3, 4)
    b = ByteTokenizer(num_sentinels=10)
    assert b.vocab_size == 4 + 256 + 10
    assert b.sentinel_id(0) == b.vocab_size - 1 and b.first_sentinel_id == 260
    assert b.encode("A").tolist() == [ord("A") + 4]


def test_byte_tokenizer_round_trip():
    b = ByteTokenizer()
    ids = b.encode(NON_ASCII)
    assert ids.min() >= NUM_RESERVED
    assert b.decode(ids) == NON_ASCII
    assert b.decode(list(ids) + [EOS_ID, 50, 60]) == NON_ASCII  # stops at eos
    assert b.decode([b.sentinel_id(2)]) == "<extra_id_2>"


def test_sentencepiece_trained_on_small_corpus_round_trips_non_ascii(tmp_path):
    proto = train_sentencepiece(CORPUS, vocab_size=370, num_sentinels=20)
    path = tmp_path / "t.model"
    path.write_bytes(proto)
    tok = SentencePieceTokenizer.load(str(path), num_sentinels=20)
    assert tok.vocab_size == 370 and tok.first_sentinel_id == 350
    for text in [NON_ASCII, CORPUS[3], CORPUS[5], "unseen: ʃ ŋ ð ж 한국어"]:
        ids = tok.encode(text)
        assert ids.min() >= NUM_RESERVED and ids.max() < tok.first_sentinel_id
        assert tok.decode(ids) == text
    # pickles as the model bytes (Grain workers), never as a pickled processor
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(NON_ASCII).tolist() == tok.encode(NON_ASCII).tolist()


def test_sentencepiece_vocab_too_large_is_a_config_error(tmp_path):
    f = tmp_path / "small.tsv"
    f.write_text("a b\tc d\n" * 5)
    cfg = DataConfig(source="tsv", path=str(f), vocab_size=5000, eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"data\.vocab_size"):
        load_tokenizer(cfg)


@pytest.mark.parametrize("n", [2, 3, 7, 20, 64, 141, 300])
def test_span_corruption_reconstructs_exactly(n):
    rng = np.random.default_rng(n)
    sentinels = np.arange(999, 899, -1, dtype=np.int32)
    for _ in range(30):
        tokens = rng.integers(NUM_RESERVED, 900, n).astype(np.int32)
        out = sc.corrupt(tokens, 0.15, 3.0, rng, sentinels)
        np.testing.assert_array_equal(sc.reconstruct(out["inputs"], out["targets"], 900), tokens)
        assert (len(out["inputs"]) + 1, len(out["targets"]) + 1) == sc.corrupted_lengths(n, 0.15, 3.0)
        assert (out["inputs"] >= 900).sum() == (out["targets"] >= 900).sum() >= 1


def test_span_corruption_noise_density_and_span_length():
    rng = np.random.default_rng(0)
    noise = total = spans = 0
    for _ in range(500):
        n = int(rng.integers(50, 300))
        mask = sc.noise_mask(n, 0.15, 3.0, rng)
        noise += mask.sum()
        total += n
        spans += (mask & ~np.concatenate([[False], mask[:-1]])).sum()
        assert not mask[0]  # starts with kept text
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.2
    # the lengths fit exactly like T5's helper: 568 tokens -> 512 inputs / 114 targets
    assert sc.chunk_length(512, 114, 0.15, 3.0) == 568
    assert sc.corrupted_lengths(568, 0.15, 3.0) == (512, 114)


def embedded(**kw):
    base = dict(source="embedded", tokenizer="bytes", inputs_length=64, targets_length=16)
    base.update(kw)
    return DataConfig(**base)


def test_embedded_split_is_deterministic_and_disjoint():
    from trainer.data.sources import make_source

    a, b = make_source(embedded(), vocab_size=None), make_source(embedded(), vocab_size=None)
    for split in ("train", "eval"):
        assert len(a._chunks[split]) == len(b._chunks[split]) > 10
    tr = {c.tobytes() for c in a._chunks["train"]}
    assert not any(c.tobytes() in tr for c in a._chunks["eval"])
    ev_frac = sum(map(len, a._chunks["eval"])) / (sum(map(len, a._chunks["train"])) + sum(map(len, a._chunks["eval"])))
    assert 0.03 < ev_frac < 0.25


def test_embedded_batches_reconstruct_source_chunks_and_pack_well():
    cfg = embedded()
    p = build_pipeline(cfg, split="train", global_batch_size=8, seed=0, vocab_size=360)
    chunks = {c.tobytes() for c in p.source._chunks["train"]}
    first = p.tokenizer.first_sentinel_id
    for _ in range(5):
        b = next(p)
        for r in range(8):
            for s in np.unique(b["inputs_segment_ids"][r]):
                if s == 0:
                    continue
                i = b["inputs"][r][b["inputs_segment_ids"][r] == s]
                t = b["targets"][r][b["targets_segment_ids"][r] == s]
                assert i[-1] == EOS_ID and t[-1] == EOS_ID
                assert sc.reconstruct(i[:-1], t[:-1], first).tobytes() in chunks
    st = p.stats
    assert st["packing_efficiency"] > 0.9, st
    assert st["truncated"] == 0 and st["dropped"] == 0


def test_embedded_sentencepiece_cached_and_recorded(tmp_path):
    cfg = DataConfig(
        source="embedded",
        vocab_size=1000,
        num_sentinels=100,
        cache_dir=str(tmp_path),
        inputs_length=64,
        targets_length=16,
    )
    p = build_pipeline(cfg, split="train", global_batch_size=4, seed=0, vocab_size=1000)
    path = p.data_config.tokenizer_path
    assert path.startswith(str(tmp_path)) and os.path.isfile(path)
    mtime = os.stat(path).st_mtime_ns
    q = build_pipeline(cfg, split="eval", global_batch_size=4, seed=0, vocab_size=1000)
    assert q.data_config.tokenizer_path == path and os.stat(path).st_mtime_ns == mtime  # reused
    b = next(p)
    assert (b["inputs"] >= 900).any()  # sentinels at the top of the vocab
    text = p.tokenizer.decode(b["inputs"][0])
    assert "<extra_id_0>" in text
    # the resolved path, fed back as data.tokenizer_path, loads the same tokenizer
    import dataclasses

    again = load_tokenizer(dataclasses.replace(cfg, tokenizer_path=path))
    assert again.encode(NON_ASCII).tolist() == p.tokenizer.encode(NON_ASCII).tolist()


def test_packed_loss_equals_unpacked_loss():
    """The model sees the same per-example loss for an example packed with others or alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model import ModelConfig, Transformer

    # Synthetic reverse: short examples, so rows hold several (embedded chunks mostly fill a row).
    cfg = DataConfig(
        source="synthetic", inputs_length=32, targets_length=32, synthetic_min_length=3, synthetic_max_length=12
    )
    p = build_pipeline(cfg, split="train", global_batch_size=4, seed=1, vocab_size=40)
    b = next(p)
    assert b["inputs_segment_ids"].max() >= 3, "need packed rows"
    mcfg = ModelConfig(
        vocab_size=40,
        vocab_multiple=8,
        d_model=32,
        num_heads=4,
        mlp_dim=64,
        encoder_layers=2,
        decoder_layers=2,
        max_length=32,
        dropout=0.0,
    )
    model = Transformer(mcfg, rngs=nnx.Rngs(0))

    @nnx.jit
    def per_token_loss(model, batch):
        logits = model(
            batch["inputs"],
            batch["targets"],
            inputs_segment_ids=batch["inputs_segment_ids"],
            targets_segment_ids=batch["targets_segment_ids"],
            inputs_positions=batch["inputs_positions"],
            targets_positions=batch["targets_positions"],
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]

    packed = np.asarray(per_token_loss(model, {k: jnp.asarray(v) for k, v in b.items()}))
    # the same examples, one per row, padded
    rows, keys = [], []
    for r in range(4):
        for s in np.unique(b["inputs_segment_ids"][r]):
            if s:
                rows.append({f: b[f][r][b[f"{f}_segment_ids"][r] == s] for f in ("inputs", "targets")})
                keys.append((r, s))
    single = {
        k: np.zeros((len(rows), n), np.int32)
        for k, n in [
            ("inputs", 32),
            ("targets", 32),
            ("inputs_segment_ids", 32),
            ("targets_segment_ids", 32),
            ("inputs_positions", 32),
            ("targets_positions", 32),
        ]
    }
    for j, ex in enumerate(rows):
        for f in ("inputs", "targets"):
            n = len(ex[f])
            single[f][j, :n] = ex[f]
            single[f"{f}_segment_ids"][j, :n] = 1
            single[f"{f}_positions"][j, :n] = np.arange(n)
    alone = np.asarray(per_token_loss(model, {k: jnp.asarray(v) for k, v in single.items()}))
    for j, (r, s) in enumerate(keys):
        m = b["targets_segment_ids"][r] == s
        lp, la = packed[r][m].mean(), alone[j][: m.sum()].mean()
        assert abs(lp - la) < 1e-5, (r, s, lp, la)


@pytest.mark.parametrize("n", [2, 3, 7, 20, 64, 127, 300])
def test_infilling_targets_are_the_original_and_inputs_fit(n):
    """BART-style infilling: deterministic given the rng, targets = the chunk, one sentinel per span."""
    sentinels = np.arange(999, 899, -1, dtype=np.int32)
    rng = np.random.default_rng(n)
    for _ in range(30):
        tokens = rng.integers(NUM_RESERVED, 900, n).astype(np.int32)
        seed = int(rng.integers(1 << 30))
        out = sc.infill(tokens, 0.15, 3.0, np.random.default_rng(seed), sentinels)
        again = sc.infill(tokens, 0.15, 3.0, np.random.default_rng(seed), sentinels)
        np.testing.assert_array_equal(out["inputs"], again["inputs"])
        np.testing.assert_array_equal(out["targets"], tokens)
        assert (len(out["inputs"]) + 1, len(out["targets"]) + 1) == sc.infilled_lengths(n, 0.15, 3.0)
        inp = out["inputs"]
        spans = inp[inp >= 900]
        np.testing.assert_array_equal(spans, sentinels[: len(spans)])  # sentinel i for span i, in order
        assert len(spans) >= 1 and inp[0] == tokens[0]  # starts with kept text
        # the kept tokens are the original's, in order, with each span collapsed to its sentinel
        mask = sc.infilling_mask(n, 0.15, 3.0, np.random.default_rng(seed))
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        expect = np.where(starts, -1, tokens)[~mask | starts]
        np.testing.assert_array_equal(np.where(inp >= 900, -1, inp), expect)
    # a chunk cut for the lengths fits them, eos included
    for i_len, t_len in [(128, 128), (64, 64), (100, 128), (128, 64), (16, 16)]:
        c = sc.chunk_length(i_len, t_len, 0.15, 3.0, "infilling")
        assert c == t_len - 1 or sc.infilled_lengths(c + 1, 0.15, 3.0)[0] > i_len
        i, t = sc.infilled_lengths(c, 0.15, 3.0)
        assert i <= i_len and t <= t_len


def test_infilling_span_lengths_are_poisson_like():
    rng = np.random.default_rng(0)
    lens = []
    for _ in range(500):
        mask = sc.infilling_mask(int(rng.integers(50, 300)), 0.15, 3.0, rng)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lens += list(edges[1::2] - edges[::2])
    lens = np.asarray(lens)
    assert lens.min() >= 1 and abs(lens.mean() - 3.0) < 0.2
    assert 1.0 < lens.var() < 3.5  # about 1 + Poisson(2): variance ~2 (uniform cuts: ~6)


def test_embedded_infilling_batches_hold_whole_chunks():
    cfg = embedded(objective="infilling", inputs_length=64, targets_length=64)
    p = build_pipeline(cfg, split="train", global_batch_size=8, seed=0, vocab_size=360)
    assert p.source.chunk_length == 63
    chunks = {c.tobytes() for c in p.source._chunks["train"]}
    b = next(p)
    for r in range(8):
        for s in np.unique(b["targets_segment_ids"][r]):
            if s:
                t = b["targets"][r][b["targets_segment_ids"][r] == s]
                i = b["inputs"][r][b["inputs_segment_ids"][r] == s]
                assert t[-1] == EOS_ID and i[-1] == EOS_ID
                assert t[:-1].tobytes() in chunks  # the target is the whole original chunk
                assert (i >= p.tokenizer.first_sentinel_id).any()


def test_objective_is_validated():
    with pytest.raises(ValueError, match=r"data\.objective: 'bart' is not one of span_corruption, infilling"):
        DataConfig(objective="bart").validate()
