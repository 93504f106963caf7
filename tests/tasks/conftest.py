"""Fixtures for the data tests: a tiny vocabulary trained on real text, cached per session."""
import itertools
import json

import pytest

from cpm2_jax.tasks import settings, vocabulary


def real_texts(shared_data, zh_docs=300, en_docs=60, en_chars=3000):
    with open(shared_data / "zh_mono.jsonl", encoding="utf-8") as handle:
        zh = [json.loads(line)["text"] for line in itertools.islice(handle, zh_docs)]
    with open(shared_data / "en_mono.jsonl", encoding="utf-8") as handle:
        en = [json.loads(line)["text"][:en_chars] for line in itertools.islice(handle, en_docs)]
    return zh, en


@pytest.fixture(scope="session")
def _tiny_vocab_model(shared_data, tmp_path_factory):
    """~2000-piece jieba+sentencepiece vocabulary (about a second to train), trained once."""
    zh, en = real_texts(shared_data)
    return vocabulary.train_sentencepiece(zh + en, tmp_path_factory.mktemp("vocab") / "tiny",
                                          vocab_size=2000, character_coverage=0.98)


@pytest.fixture(scope="package")
def tiny_vocab(_tiny_vocab_model):
    """The tiny vocabulary, configured as the tasks' vocabulary for tests/tasks only: the override
    ends when the worker leaves this package (a session-wide one leaked into later test files)."""
    settings.set_vocabulary_path(_tiny_vocab_model)
    yield vocabulary.SentencePieceVocabulary(_tiny_vocab_model, extra_ids=100)
    settings.set_vocabulary_path(None)
