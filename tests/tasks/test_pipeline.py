"""Deterministic, resumable batches; truncation counted; pre-training mixture rates; closing."""
import gc
import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

from cpm2_jax.errors import ConfigError, DataError
from cpm2_jax.tasks import pipeline, pretraining, settings, sources
from tests.tasks.conftest import real_texts

LENGTHS = {"inputs": 64, "targets": 32}


@pytest.fixture(scope="module")
def corpus_dir(shared_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    zh, en = real_texts(shared_data, zh_docs=120, en_docs=8, en_chars=1500)
    with open(directory / "docs.jsonl", "w", encoding="utf-8") as handle:
        for text in zh + en:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return directory


def toy_task(name, directory, vocab):
    source = pretraining.CorpusSource(name, "zh", files=["docs.jsonl"], directory=lambda: directory)
    return pretraining.span_corruption_task(name, source, vocab)


@pytest.fixture(scope="module")
def corpus_task(corpus_dir, tiny_vocab):
    return toy_task("toy_corpus", corpus_dir, tiny_vocab)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_and_resume(corpus_task):
    kwargs = dict(feature_lengths=LENGTHS, batch_size=4, seed=7)
    straight = _take(pipeline.get_batch_iterator(corpus_task, **kwargs), 6)
    again = _take(pipeline.get_batch_iterator(corpus_task, **kwargs), 6)
    assert all(_same(a, b) for a, b in zip(straight, again))
    resumed = _take(pipeline.get_batch_iterator(corpus_task, start_step=4, **kwargs), 2)
    assert all(_same(a, b) for a, b in zip(straight[4:], resumed))
    other = next(pipeline.get_batch_iterator(corpus_task, feature_lengths=LENGTHS, batch_size=4, seed=8))
    assert not _same(straight[0], other)


def test_state_restore_round_trip(corpus_task, monkeypatch):
    iterator = pipeline.get_batch_iterator(corpus_task, feature_lengths=LENGTHS, batch_size=2, seed=3)
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.state()))
    assert state["step"] == 3
    expected = next(iterator)
    # Restoring resolves the provider by name; serve the toy task under that name.
    monkeypatch.setattr(pipeline, "get_provider", lambda name: corpus_task)
    assert _same(next(pipeline.BatchIterator.restore(state)), expected)


def test_batch_layout_and_packing(corpus_task, tiny_vocab):
    batch = next(pipeline.get_batch_iterator(corpus_task, feature_lengths=LENGTHS, batch_size=3, seed=0))
    assert batch["encoder_input_tokens"].shape == (3, 64) and batch["decoder_target_tokens"].shape == (3, 32)
    assert batch["encoder_input_tokens"].dtype == np.int32
    assert "encoder_segment_ids" in batch
    sentinel0 = tiny_vocab.sentinel_id(0)
    assert (batch["decoder_target_tokens"] == sentinel0).any()
    # Shards see different data.
    first = next(pipeline.get_batch_iterator(corpus_task, feature_lengths=LENGTHS, batch_size=3, seed=0,
                                             shard_index=1, num_shards=2))
    assert not _same(batch, first)


def test_truncation_is_counted(tmp_path, tiny_vocab):
    from cpm2_jax.tasks import downstream
    from cpm2_jax.tasks.text_to_text import build_task

    (tmp_path / "dev.txt").write_text("短句\t短句\t1\n" + "很长的句子" * 40 + "\t短\t0\n", encoding="utf-8")
    task = build_task({s.name: s for s in downstream.specs()}["cpm2_lcqmc"], tiny_vocab, directory=tmp_path)
    iterator = pipeline.get_batch_iterator(task, split="validation", feature_lengths={"inputs": 32, "targets": 8},
                                           batch_size=2, shuffle=False, num_epochs=1, pack=False)
    batch = next(iterator)
    assert batch["encoder_input_tokens"].shape == (2, 32)
    assert iterator.stats() == {"examples": 2, "truncated_inputs": 1, "truncated_targets": 0}


def test_registered_mixture_rate_and_unknown_names():
    provider = pipeline.get_provider(pretraining.BILINGUAL_MIXTURE)
    rates = {task.name: provider.get_rate(task) for task in provider.tasks}
    assert rates == {pretraining.ZH_TASK: 2.0, pretraining.EN_TASK: 1.0}
    with pytest.raises(ConfigError, match="did you mean 'en_zh'"):
        pipeline.get_provider("en_zhh")


def test_missing_pretraining_data_names_path_and_task(tmp_path, tiny_vocab):
    settings.set_data_dir(tmp_path / "absent")
    try:
        with pytest.raises(DataError, match=r"cpm2_pretrain_zh.*absent"):
            next(pipeline.get_batch_iterator(pretraining.ZH_TASK, feature_lengths=LENGTHS, batch_size=2))
    finally:
        settings.set_data_dir(None)


def test_malformed_pretraining_record_fails_with_file_and_line(tmp_path, tiny_vocab):
    (tmp_path / "zh_mono.jsonl").write_text(json.dumps({"text": "第一篇"}, ensure_ascii=False) + "\n{oops\n")
    settings.set_data_dir(tmp_path)
    settings.set_malformed_policy("fail")
    try:
        with pytest.raises(DataError, match=r"zh_mono\.jsonl:2"):
            _take(pipeline.get_batch_iterator(pretraining.ZH_TASK, feature_lengths=LENGTHS, batch_size=1,
                                              num_epochs=1, shuffle=False), 3)
    finally:
        settings.set_data_dir(None)
        settings.set_malformed_policy(None)


def _live_generators(task_name):
    """Unfinished `read_records` generators of `task_name` still alive (after a collection)."""
    gc.collect()
    return [g for g in gc.get_objects()
            if inspect.isgenerator(g) and g.gi_code is sources.read_records.__code__ and g.gi_frame is not None
            and g.gi_frame.f_locals.get("task") == task_name]


def test_close_releases_the_source_generator(corpus_dir, tiny_vocab):
    task = toy_task("toy_close", corpus_dir, tiny_vocab)
    kwargs = dict(feature_lengths=LENGTHS, batch_size=2, shuffle=False)
    iterator = pipeline.get_batch_iterator(task, **kwargs)
    first = _take(iterator, 2)
    # (Whether the source generator is still alive here depends on how far tf.data's
    # prefetching got - a small corpus may already be exhausted - so only the state after
    # close() is asserted.)
    iterator.close()
    assert iterator.closed and _live_generators("toy_close") == []
    iterator.close()  # idempotent
    with pytest.raises(StopIteration):
        next(iterator)
    assert iterator.state()["step"] == 2 and iterator.stats()["examples"] > 0
    with pipeline.get_batch_iterator(task, **kwargs) as again:
        assert all(_same(a, b) for a, b in zip(first, _take(again, 2)))
        pipeline.close_all()  # what the atexit hook runs
        assert again.closed and _live_generators("toy_close") == []
    assert again.closed


def _holdout(texts, split):
    dataset = tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, tf.string)})
    out = pretraining.holdout(dataset, split, task="toy", where="data dir /nowhere (docs.jsonl)")
    try:
        return [x["text"].decode() for x in out.as_numpy_iterator()]
    except tf.errors.OpError as err:
        raise pipeline.data_error_from(err) from None


def _in_bucket(text):
    return int(tf.strings.to_hash_bucket_fast(text, pretraining.VALIDATION_BUCKETS)) == 0


def test_holdout_is_the_hash_bucket_when_it_is_not_empty():
    docs = [f"document {i}" for i in range(500)]
    held = [d for d in docs if _in_bucket(d)]
    assert held  # about 5 of 500
    assert _holdout(docs, "validation") == held
    assert _holdout(docs, "train") == [d for d in docs if not _in_bucket(d)]  # same documents, same order


def test_holdout_never_leaves_validation_empty():
    docs = [d for d in (f"document {i}" for i in range(50)) if not _in_bucket(d)][:4]
    assert _holdout(docs, "validation") == docs[-1:]  # the last document stands in for the empty bucket
    assert _holdout(docs, "train") == docs[:-1]
    assert _holdout(docs[:2], "validation") == docs[1:2] and _holdout(docs[:2], "train") == docs[:1]
    with pytest.raises(DataError, match=r"task 'toy' split 'validation'.*1 document.*/nowhere.*Hint"):
        _holdout(docs[:1], "validation")
    assert _holdout(docs[:1], "train") == docs[:1]
    bucketed = next(d for d in (f"document {i}" for i in range(500)) if _in_bucket(d))
    with pytest.raises(DataError, match=r"task 'toy' split 'train'.*/nowhere.*Hint"):
        _holdout([bucketed], "train")


def test_one_document_corpus_names_task_split_and_data_dir(tmp_path, tiny_vocab):
    (tmp_path / "zh_mono.jsonl").write_text(json.dumps({"text": "只有一篇文档。"}, ensure_ascii=False) + "\n")
    settings.set_data_dir(tmp_path)
    try:
        with pytest.raises(DataError, match=rf"task 'cpm2_pretrain_zh' split 'validation'.*{tmp_path}"):
            with pipeline.get_batch_iterator(pretraining.ZH_TASK, split="validation", feature_lengths=LENGTHS,
                                             batch_size=1, num_epochs=1, shuffle=False) as iterator:
                next(iterator)
    finally:
        settings.set_data_dir(None)


def test_truncation_is_logged_once_and_counted(tmp_path, tiny_vocab, caplog):
    import logging

    from cpm2_jax.tasks import downstream, streams
    from cpm2_jax.tasks.text_to_text import build_task

    (tmp_path / "train.txt").write_text("".join(f"很长的句子{i}" * 20 + f"\t短{i}\t1\n" for i in range(6)),
                                        encoding="utf-8")
    task = build_task({s.name: s for s in downstream.specs()}["cpm2_lcqmc"], tiny_vocab, directory=tmp_path)
    streams.WARN_ONCE.seen.discard((task.name, "truncated_inputs"))
    with caplog.at_level(logging.WARNING):
        iterator = pipeline.get_batch_iterator(task, feature_lengths={"inputs": 16, "targets": 8}, batch_size=2,
                                               pack=False)
        _take(iterator, 6)
    assert iterator.stats()["truncated_inputs"] == 12
    assert caplog.text.count("inputs longer than 16 tokens are cut") == 1
