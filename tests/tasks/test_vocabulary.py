"""Vocabulary: exact round trip, sentinels at the end, separator, vocab.txt, extension."""
import numpy as np
import pytest
import tensorflow as tf

from cpm2_jax.errors import ConfigError
from cpm2_jax.tasks import vocabulary as V
from tests.tasks.conftest import real_texts

MIXED = [
    "我爱北京天安门 and  the man page\nsecond line",
    "  前导空格与 trailing spaces  \n\n两个换行\ttab and 全角　空格",
    "printf(\"%s: %d\\n\", name, 42); // 注释：打印结果！",
    "emoji 😀 and rare 龘 chars, Ünïcödé ñ",
    "",
]


def test_round_trip_mixed_text(tiny_vocab, shared_data):
    zh, en = real_texts(shared_data, zh_docs=40, en_docs=10)
    for text in MIXED + zh + en:
        ids = tiny_vocab.encode(text)
        assert tiny_vocab.decode(ids) == text
        assert all(0 <= i < tiny_vocab.vocab_size - tiny_vocab.extra_ids for i in ids)


def test_space_and_newline_are_visible_pieces(tiny_vocab):
    ids = tiny_vocab.encode("a b\nc")
    pieces = [tiny_vocab.processor.id_to_piece(i) for i in ids]
    assert V.SPACE_PLACEHOLDER in pieces and V.NEWLINE_PLACEHOLDER in pieces


def test_words_segmented_by_jieba_first(tiny_vocab):
    # No piece crosses a jieba word boundary: pieces of each word concatenate to the word.
    text = "我们今天学习自然语言处理"
    words = V.segment_words(text)
    assert "".join(words) == text
    assert tiny_vocab.encode(text) == [i for w in words for i in tiny_vocab.encode(w)]


def test_special_ids_and_sentinels_at_end(tiny_vocab):
    size = tiny_vocab.vocab_size
    assert (tiny_vocab.pad_id, tiny_vocab.eos_id, tiny_vocab.unk_id, tiny_vocab.sep_id) == (0, 1, 2, 3)
    assert tiny_vocab.extra_ids == 100
    assert tiny_vocab.sentinel_id(0) == size - 1
    assert tiny_vocab.sentinel_id(99) == size - 100
    assert tiny_vocab.pieces()[size - 1] == "<extra_id_0>"
    with pytest.raises(ConfigError):
        tiny_vocab.sentinel_id(100)
    ids = tiny_vocab.encode("前<extra_id_0>后<extra_id_7>")
    assert ids.count(size - 1) == 1 and ids.count(size - 8) == 1
    assert tiny_vocab.decode(ids) == "前<extra_id_0>后<extra_id_7>"


def test_separator_marker(tiny_vocab):
    ids = tiny_vocab.encode("第一句<sep>第二句")
    assert ids.count(V.SEP_ID) == 1
    assert tiny_vocab.decode(ids) == "第一句<sep>第二句"


def test_decode_stops_at_eos_and_tf_matches(tiny_vocab):
    ids = tiny_vocab.encode("你好 world") + [1] + tiny_vocab.encode("垃圾")
    assert tiny_vocab.decode(ids) == "你好 world"
    batch = tf.constant([ids, ids], tf.int32)
    assert [t.decode() for t in tiny_vocab.decode_tf(batch).numpy()] == ["你好 world"] * 2
    encoded = tiny_vocab.encode_tf(tf.constant("你好 world"))
    assert encoded.numpy().tolist() == tiny_vocab.encode("你好 world")


def _write_vocab_txt(path):
    # The released layout: specials in their own order, pieces, sentinels <s_N> at the end.
    lines = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<eod>", "\u2582",
             "北京", "北", "京", "大学", "大", "学", "生", "我", "是", "的", "a", "ab", "abc", "b", "c",
             "<s_0>", "<s_1>", "<s_2>"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_vocab_txt_greedy_longest_match(tmp_path):
    lines = _write_vocab_txt(tmp_path / "vocab.txt")
    vocab = V.WordPieceVocabulary.from_vocab_txt(tmp_path / "vocab.txt")
    # Every line gets exactly one id: the id order is a permutation of the file's lines.
    assert vocab.extra_ids == 3 and vocab.vocab_size == len(lines)
    assert sorted(vocab.released_ids.tolist()) == list(range(len(lines)))
    pieces = vocab.pieces()
    assert pieces[:4] == ["<pad>", "</s>", "<unk>", "<sep>"]
    assert pieces[-1] == "<extra_id_0>"
    # released_ids maps every id back to the file line (for permuting checkpoint rows).
    assert lines[vocab.released_ids[0]] == "<pad>" and lines[vocab.released_ids[1]] == "<eod>"
    assert lines[vocab.released_ids[vocab.sentinel_id(0)]] == "<s_0>"
    assert lines[vocab.released_ids[vocab.sentinel_id(2)]] == "<s_2>"
    # Greedy longest match: "abcab" -> abc + ab; "北京大学生" -> 北京 + 大学 + 生.
    assert [pieces[i] for i in vocab.split_word("abcab")] == ["abc", "ab"]
    assert [pieces[i] for i in vocab.split_word("北京大学生")] == ["北京", "大学", "生"]
    assert vocab.split_word("x") == [V.UNK_ID]
    text = "我是 北京\n大学生"
    assert vocab.decode(vocab.encode(text)) == text


def test_vocab_txt_extension_keeps_ids(tmp_path):
    _write_vocab_txt(tmp_path / "vocab.txt")
    zh = V.WordPieceVocabulary.from_vocab_txt(tmp_path / "vocab.txt")
    bilingual, report = zh.extended(["the", "them", "北京", "abcd"], extra_ids=5)
    old, new = zh.pieces(), bilingual.pieces()
    base = zh.vocab_size - zh.extra_ids
    assert new[:base] == old[:base]
    assert [new[i] for i in report.new_ids] == ["the", "them", "abcd"]
    assert report.new_pieces == ("the", "them", "abcd")
    # Sentinel k keeps being the k-th id from the end.
    for k in range(zh.extra_ids):
        assert report.old_to_new[zh.sentinel_id(k)] == bilingual.sentinel_id(k)
    np.testing.assert_array_equal(report.old_to_new[:base], np.arange(base))
    # Longest prefix already in the old vocabulary: "abcd" -> "abc"; "the"/"them" -> none.
    assert [old[i] if i >= 0 else None for i in report.inherit_from] == [None, None, "abc"]
    bilingual.write_vocab_txt(tmp_path / "bi.txt")
    again = V.WordPieceVocabulary.from_vocab_txt(tmp_path / "bi.txt")
    assert again.pieces() == bilingual.pieces()


def test_sentencepiece_extension(tiny_vocab, tmp_path):
    extended, report = tiny_vocab.extended(["photosynthesis", "量子纠缠"], tmp_path / "ext.model")
    base = tiny_vocab.vocab_size - tiny_vocab.extra_ids
    assert extended.pieces()[:base] == tiny_vocab.pieces()[:base]
    assert list(report.new_ids) == [base, base + 1]
    assert extended.encode("photosynthesis") == [base]
    assert extended.decode(extended.encode("光合作用 photosynthesis 量子纠缠")) == "光合作用 photosynthesis 量子纠缠"


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        V.load_vocabulary(tmp_path / "missing.model")
    with pytest.raises(ConfigError, match="vocab.txt not found"):
        V.WordPieceVocabulary.from_vocab_txt(tmp_path / "missing.txt")


def test_decode_tf_of_zero_length_ids(tiny_vocab):
    assert tiny_vocab.decode_tf(tf.zeros([0], tf.int32)).numpy() == b""
    assert list(tiny_vocab.decode_tf(tf.zeros([2, 0], tf.int32)).numpy()) == [b"", b""]
    assert tiny_vocab.decode_tf(tf.zeros([0, 3], tf.int32)).shape == (0,)


RELEASED = {"zh": "zh_vocab.txt", "bilingual": "bilingual_vocab.txt"}


def test_half_width_by_hand():
    assert V.half_width("ＡＢＣ１２３ａｂｃ＋－＝＠　ｘ") == "ABC123abc+-=@ x"
    # The nine marks the released tokenizer keeps full-width, and text outside U+FF00..FF5E.
    assert V.half_width("，。！（）？、；：") == "，。！（）？、；："
    assert V.half_width("中文「引号」～·…") == "中文「引号」~·…"
    assert V.half_width("！＂＃") == "！\"#"


def _released_ids(lines, text):
    """The released `EncDecTokenizer.encode`, step by step as written there: Q2B per character,
    jieba on the text, placeholders per word, greedy longest match over the file's lines."""
    index = {token: number for number, token in enumerate(lines)}
    chars = []
    for char in text:
        code = ord(char)
        if char not in "，。！（）？、；：":
            code = 0x20 if code == 0x3000 else code - 0xFEE0
        chars.append(chr(code) if 0x20 <= code <= 0x7E and char not in "，。！（）？、；：" else char)
    ids = []
    for word in V._jieba().lcut("".join(chars)):
        word = word.replace(" ", "\u2582").replace("\n", "\u2583")
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                if word[start:end] in index:
                    ids.append(index[word[start:end]])
                    start = end
                    break
            else:
                ids.append(index["<unk>"])
                start += 1
    return ids


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_vocabularies_normalise_like_the_released_tokenizer(shared_data, name):
    path = shared_data / "cpm2_vocab" / RELEASED[name]
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    vocab = V.load_vocabulary(path)
    assert vocab.normalize
    texts = ["全角ＡＢＣ与１２３，空格　在这里！", "ｐｒｉｎｔｆ（＂％ｓ＂）；　ｏｋ", "无法打开文件 %s：权限不够\n"]
    with open(shared_data / "en_zh_validation.jsonl", encoding="utf-8") as handle:
        records = [__import__("json").loads(line) for line in handle]
    texts += [r["zh"] for r in records if any(0xFF00 <= ord(c) <= 0xFF5E or c == "\u3000" for c in r["zh"])][:40]
    for text in texts:
        ours = [int(vocab.released_ids[i]) for i in vocab.encode(text)]
        assert ours == _released_ids(lines, text), text
    # Off, U+3000 stays a character no piece covers.
    plain = V.WordPieceVocabulary.from_vocab_txt(path, normalize=False)
    assert V.UNK_ID in plain.encode("空格　在") and V.UNK_ID not in vocab.encode("空格　在")


def test_auto_vocabulary_is_deterministic_and_keyed_by_data_and_settings(shared_data, tmp_path, monkeypatch):
    from cpm2_jax.tasks import settings

    zh, en = real_texts(shared_data, zh_docs=60, en_docs=10, en_chars=800)
    data = tmp_path / "data"
    data.mkdir()
    for name, texts in (("zh_mono.jsonl", zh), ("en_mono.jsonl", en)):
        (data / name).write_text("".join(__import__("json").dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setattr(settings, "AUTO_VOCAB_SETTINGS", dict(settings.AUTO_VOCAB_SETTINGS, vocab_size=3000))
    monkeypatch.setenv("CPM2_DATA_DIR", str(data))
    built = []
    for cache in ("a", "b"):
        monkeypatch.setenv("CPM2_CACHE_DIR", str(tmp_path / cache))
        built.append(settings.auto_vocabulary())
    assert built[0].name == built[1].name and built[0].read_bytes() == built[1].read_bytes()
    (data / "zh_mono.jsonl").write_text("".join(__import__("json").dumps({"text": t}) + "\n" for t in zh[:-1]))
    assert settings.auto_vocabulary().name != built[0].name
    monkeypatch.setattr(settings, "AUTO_VOCAB_SETTINGS", dict(settings.AUTO_VOCAB_SETTINGS, character_coverage=0.99))
    assert settings.auto_vocabulary().name != built[0].name


def test_sentencepiece_normalisation_is_an_option(tiny_vocab):
    normalised = V.SentencePieceVocabulary(tiny_vocab.model_file, extra_ids=100, normalize=True)
    assert not tiny_vocab.normalize and normalised != tiny_vocab
    assert normalised.encode("ＡＢＣ１２３　ｘ") == tiny_vocab.encode("ABC123 x")
    assert tiny_vocab.decode(tiny_vocab.encode("ＡＢＣ")) == "ＡＢＣ"  # off: the exact round trip stays
