"""Join-then-cut pre-training examples, the global shuffle and the constant-time resume."""
import collections
import json

import numpy as np
import pytest

from cpm2_jax import datasets
from cpm2_jax.tasks import corpus_index, pipeline, pretraining, settings, span_corruption
from tests.tasks.conftest import real_texts

FULL = span_corruption.feature_lengths_for(512)  # {'inputs': 512, 'targets': 114}
SMALL = span_corruption.feature_lengths_for(64)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _reconstruct(inputs, targets, vocab):
    """The raw chunk of a span-corrupted example: each input sentinel replaced by the tokens
    after the same sentinel in the targets (EOS dropped from both)."""
    sentinel = lambda t: t >= vocab.vocab_size - vocab.extra_ids  # noqa: E731
    pieces, current = {}, None
    for token in targets[:-1]:
        if sentinel(token):
            current = token
            pieces[current] = []
        else:
            pieces[current].append(int(token))
    out = []
    for token in inputs[:-1]:
        out += pieces[token] if sentinel(token) else [int(token)]
    return out


@pytest.fixture()
def small_corpus(shared_data, tmp_path, tiny_vocab):
    """zh_mono/en_mono of 80 + 12 real documents in a data directory of their own."""
    zh, en = real_texts(shared_data, zh_docs=80, en_docs=12, en_chars=1200)
    for name, texts in (("zh_mono.jsonl", zh), ("en_mono.jsonl", en)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                     encoding="utf-8")
    settings.set_data_dir(tmp_path)
    yield tmp_path
    settings.set_data_dir(None)


@pytest.mark.parametrize("task", [pretraining.ZH_TASK, pretraining.EN_TASK])
def test_shared_monolingual_examples_fill_512_inputs_exactly(task, tiny_vocab):
    """Over ../shared/data: every example has exactly 512 input tokens and 114 targets, with
    85 noise tokens in 28 spans (the formula for a 568-token chunk)."""
    noise, spans = span_corruption.span_counts(568)
    assert (noise, spans) == (85, 28)
    with pipeline.get_batch_iterator(task, feature_lengths=FULL, batch_size=8, seed=1, pack=False) as iterator:
        for _ in range(3):
            batch = next(iterator)
            assert (batch["encoder_input_tokens"] > 0).sum(axis=1).tolist() == [512] * 8
            assert (batch["decoder_target_tokens"] > 0).sum(axis=1).tolist() == [114] * 8
            assert (batch["encoder_input_tokens"][:, -1] == tiny_vocab.eos_id).all()
            first_sentinel = tiny_vocab.vocab_size - tiny_vocab.extra_ids
            assert ((batch["encoder_input_tokens"] >= first_sentinel).sum(axis=1) == spans).all()
            assert ((batch["decoder_target_tokens"] >= first_sentinel).sum(axis=1) == spans).all()
        assert iterator.stats()["truncated_inputs"] == iterator.stats()["truncated_targets"] == 0


def test_documents_are_joined_then_cut_and_only_the_last_example_is_short(small_corpus, tiny_vocab):
    """In file order, the reconstructed chunks are the documents' tokens + EOS, concatenated."""
    iterator = pipeline.get_batch_iterator(pretraining.ZH_TASK, feature_lengths=SMALL, batch_size=1, seed=0,
                                           pack=False, shuffle=False, num_epochs=1)
    chunk_length, _ = span_corruption.chunk_length_for(SMALL["inputs"])
    chunks, lengths = [], []
    for batch in iterator:
        inputs = batch["encoder_input_tokens"][0][batch["encoder_input_tokens"][0] > 0]
        targets = batch["decoder_target_tokens"][0][batch["decoder_target_tokens"][0] > 0]
        chunks.append(_reconstruct(inputs, targets, tiny_vocab))
        lengths.append(len(inputs))
    split = corpus_index.CorpusSplit("t", "train", [small_corpus / "zh_mono.jsonl"])
    stream = [t for i in range(len(split)) for t in tiny_vocab.encode(split.read(i)) + [tiny_vocab.eos_id]]
    assert [t for c in chunks for t in c] == stream
    assert all(len(c) == chunk_length for c in chunks[:-1]) and 2 <= len(chunks[-1]) <= chunk_length
    assert set(lengths[:-1]) == {SMALL["inputs"]}


def _reads_logged(monkeypatch):
    """(task, document) of every corpus read, in order."""
    log = []
    read = corpus_index.CorpusSplit.read

    def logged(self, i):
        log.append((self.task, i))
        return read(self, i)

    monkeypatch.setattr(corpus_index.CorpusSplit, "read", logged)
    return log


@pytest.mark.parametrize("num_shards", [1, 2])
def test_resume_reads_only_what_it_yields_and_equals_a_straight_run(small_corpus, tiny_vocab, monkeypatch,
                                                                    num_shards):
    """A resume at step N gives the straight run's batches N.., and reads no document that
    the straight run had finished before step N (only the one it was cutting, again)."""
    reads = _reads_logged(monkeypatch)
    kwargs = dict(feature_lengths=SMALL, batch_size=3, seed=4, num_shards=num_shards)
    n, m = 6, 4
    for shard in range(num_shards):
        straight = pipeline.get_batch_iterator(pretraining.BILINGUAL_MIXTURE, shard_index=shard, **kwargs)
        del reads[:]
        before = [next(straight) for _ in range(n)]
        read_before = list(reads)
        state = json.loads(json.dumps(straight.state()))
        mark = len(reads)
        expected = [next(straight) for _ in range(m)]
        read_after = reads[mark:]
        del reads[:]
        resumed = pipeline.BatchIterator.restore(state)
        got = [next(resumed) for _ in range(m)]
        assert all(_same(a, b) for a, b in zip(expected, got))
        assert resumed.step == n + m and resumed.state()["position"] == straight.state()["position"]
        orders = {s.name: s.order for s in resumed._stream.streams}
        cutting = {(task, orders[task].record(s["current"]["epoch"], s["current"]["position"]))
                   for task, s in state["position"]["stream"]["tasks"].items() if s["current"] is not None}
        again = [r for r in reads if r in set(read_before)]
        assert set(again) <= cutting and len(again) <= len(cutting)  # only documents being cut at step N
        assert collections.Counter(reads) - collections.Counter(again) == collections.Counter(read_after)
        assert before  # (the first N batches were produced by the straight run only)
    if num_shards == 2:  # the shards of an epoch share out its documents: no document twice
        zero = pipeline.get_batch_iterator(pretraining.ZH_TASK, shard_index=0, **kwargs)._stream
        one = pipeline.get_batch_iterator(pretraining.ZH_TASK, shard_index=1, **kwargs)._stream
        picks = [s.order.record(0, p) for s in (zero, one) for p in range(s.order.per_epoch)]
        assert sorted(picks) == list(range(len(zero.corpus)))


def test_dataset_state_gathers_every_process_and_restores_each(small_corpus, tiny_vocab):
    """`datasets.get_dataset`: the saved state holds both processes' positions; each process
    resumes from its own, in constant time, with the batches of a straight run."""
    config = datasets.DatasetConfig(pretraining.BILINGUAL_MIXTURE, SMALL, batch_size=4, seed=2)
    sources = [datasets.get_dataset(config, shard_index=k, num_shards=2) for k in range(2)]
    for source in sources:
        [next(source) for _ in range(10)]
    mine = [json.dumps(s._iterator.position(), separators=(",", ":")).encode() for s in sources]
    for k, source in enumerate(sources):
        source._gather = lambda payload, k=k: mine  # what the all-gather returns on each process
    states = [json.loads(json.dumps(s.state())) for s in sources]
    assert states[0] == states[1] and len(states[0][datasets.POSITIONS_KEY]) == 2 and states[0]["step"] == 10
    expected = [[next(s) for _ in range(2)] for s in sources]
    for k in range(2):
        resumed = datasets.get_dataset(config, shard_index=k, num_shards=2, start_step=10, data_state=states[0])
        assert resumed.records_read() <= 2 and resumed.step == 10  # no replay: at most the documents being cut
        assert all(_same(a, b) for a, b in zip(expected[k], [next(resumed) for _ in range(2)]))
    # A position saved under other settings is not applied: the pipeline replays instead.
    other = datasets.get_dataset(datasets.DatasetConfig(pretraining.BILINGUAL_MIXTURE, SMALL, batch_size=4, seed=3),
                                 shard_index=0, num_shards=2, start_step=10, data_state=states[0])
    assert other.step == 10 and other.records_read() > 2


def test_consecutive_examples_come_from_across_the_whole_file(shared_data, tiny_vocab):
    """en_zh_train.jsonl is ordered by program: 100 consecutive training examples span about
    as many programs as 100 records drawn at random, and their inputs are those records."""
    records = [json.loads(line) for line in open(shared_data / "en_zh_train.jsonl", encoding="utf-8")]
    domains = [r["domain"] for r in records]
    iterator = pipeline.get_batch_iterator("en_zh", feature_lengths={"inputs": 256, "targets": 256},
                                           batch_size=100, seed=0, pack=False)
    batch = next(iterator)
    order = iterator._stream.order
    picked = [order.record(0, p) for p in range(100)]
    texts = [tiny_vocab.decode(row) for row in batch["encoder_input_tokens"]]
    assert texts == [f"英译中：{records[i]['en']}" for i in picked]
    consecutive = len({domains[i] for i in picked})
    sampled = len({domains[i] for i in np.random.default_rng(0).choice(len(records), 100, replace=False)})
    in_file_order = len(set(domains[:100]))
    assert consecutive >= 0.8 * sampled and in_file_order <= 3 < consecutive
    assert max(picked) - min(picked) > 0.8 * len(records)


def test_corpus_split_holds_out_what_the_seqio_holdout_holds_out(small_corpus):
    """The index's split and `pretraining.holdout` (the seqio path) agree document for document."""
    import tensorflow as tf

    path = small_corpus / "en_mono.jsonl"
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    for split in ("train", "validation"):
        indexed = corpus_index.CorpusSplit("t", split, [path])
        dataset = tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts)})
        expected = [x["text"].decode() for x in pretraining.holdout(dataset, split).as_numpy_iterator()]
        assert [indexed.read(i) for i in range(len(indexed))] == expected
