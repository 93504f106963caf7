"""CPM-2 vocabularies as `seqio.Vocabulary`: jieba words first, then sub-word pieces.

CPM-2 segments text into words with jieba, maps space and newline to the visible
placeholders U+2582 '▂' and U+2583 '▃' (so they survive tokenisation), and splits each
word into pieces. Two piece models are provided:

* `SentencePieceVocabulary`: a sentencepiece model trained here on jieba-segmented text
  (`train_sentencepiece`, `cpm2 vocab train`). Byte fallback and the identity normaliser
  make encode/decode an exact round trip on any text without the placeholder characters.
* `WordPieceVocabulary`: the released CPM-2 `vocab.txt` (one piece a line; special tokens
  `<pad>`, `<unk>`, `<eod>`, `<sep>`, sentinels `<s_N>`), split by greedy longest match.

Id conventions shared by both (T5/mT5, what seqio's feature converters assume):
pad 0, eos 1, unk 2, the sentence-pair separator `<sep>` 3 (`SEP_PIECE`; prompt tuning
puts "middle" prompts where it stands), and sentinels counted down from the END of the
vocabulary: `<extra_id_0>` = vocab_size - 1, `<extra_id_1>` = vocab_size - 2, ...
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from cpm2_jax.errors import ConfigError

PAD_ID, EOS_ID, UNK_ID, SEP_ID = 0, 1, 2, 3
PAD_PIECE, EOS_PIECE, UNK_PIECE, SEP_PIECE = "<pad>", "</s>", "<unk>", "<sep>"
SPACE_PLACEHOLDER, NEWLINE_PLACEHOLDER = "\u2582", "\u2583"
_TO_PLACEHOLDERS = str.maketrans({" ": SPACE_PLACEHOLDER, "\n": NEWLINE_PLACEHOLDER})
_FROM_PLACEHOLDERS = str.maketrans({SPACE_PLACEHOLDER: " ", NEWLINE_PLACEHOLDER: "\n"})
# The released CPM-2 vocab.txt names: <eod> ends a document, <s_N> is sentinel N.
_RELEASED_EOS_NAMES = ("<eod>", "</s>")
_RELEASED_SENTINEL_PREFIX = "<s_"
# Markers written literally in task text: `<sep>` and `<extra_id_N>` encode to their ids.
_MARKER = re.compile(r"(<sep>|<extra_id_\d+>)")


@functools.lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(60)
    jieba.initialize()
    return jieba


def segment_words(text: str) -> list[str]:
    """jieba words of `text` with space/newline replaced by their visible placeholders."""
    return _jieba().lcut(text.translate(_TO_PLACEHOLDERS))


# The released tokenizer's `Q2B`: full-width forms U+FF00..U+FF5E -> ASCII (code - 0xFEE0) and the
# ideographic space U+3000 -> ' ', except nine Chinese punctuation marks it keeps full-width.
KEPT_FULL_WIDTH = "，。！（）？、；："
_HALF_WIDTH = {code: code - 0xFEE0 for code in range(0xFF00, 0xFF5F) if chr(code) not in KEPT_FULL_WIDTH}
_HALF_WIDTH[0x3000] = 0x20


def half_width(text: str) -> str:
    """Full-width -> half-width as the released CPM-2 tokenizer applies before segmenting."""
    return text.translate(_HALF_WIDTH)


def released_words(text: str) -> list[str]:
    """The released tokenizer's words: half-width text cut by jieba, then each word's
    space/newline replaced by the placeholders (jieba sees the real whitespace)."""
    return [word.translate(_TO_PLACEHOLDERS) for word in _jieba().lcut(half_width(text))]


def restore_whitespace(text: str) -> str:
    """Inverse of the placeholder mapping: '▂' -> ' ', '▃' -> newline."""
    return text.translate(_FROM_PLACEHOLDERS)


def sentinel_name(index: int) -> str:
    return f"<extra_id_{index}>"


class Cpm2Vocabulary(seqio.Vocabulary):
    """Shared seqio plumbing: tf wrappers, sentinels at the end, the separator id."""

    def __init__(self, extra_ids: int):
        super().__init__(extra_ids=extra_ids)

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> None:
        return None

    @property
    def sep_id(self) -> int:
        """Id of the sentence-pair boundary marker `<sep>`."""
        return SEP_ID

    def sentinel_id(self, index: int) -> int:
        """`<extra_id_{index}>`: counted down from the last id of the vocabulary."""
        if not 0 <= index < self.extra_ids:
            raise ConfigError(f"sentinel {index} out of range: this vocabulary has {self.extra_ids}")
        return self.vocab_size - 1 - index

    def is_sentinel(self, token_id: int) -> bool:
        return self._base_vocab_size <= token_id < self.vocab_size

    def _pieces_to_text(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode(self, s: str) -> list[int]:
        """Ids of `s`; the literal markers `<sep>` and `<extra_id_N>` become their own ids."""
        ids: list[int] = []
        for part in _MARKER.split(s):
            if part == SEP_PIECE:
                ids.append(SEP_ID)
            elif part.startswith("<extra_id_") and int(part[10:-1]) < self.extra_ids:
                ids.append(self.sentinel_id(int(part[10:-1])))
            elif part:
                ids += self._encode_text(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; unlike seqio's default, sentinels stay visible."""
        if isinstance(ids, tf.Tensor):
            ids = ids.numpy()
        clean = [int(i) for i in np.asarray(ids).reshape(-1)]
        if EOS_ID in clean:
            clean = clean[:clean.index(EOS_ID)]
        return self._decode([i if 0 <= i < self.vocab_size else UNK_ID for i in clean])

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Batched `decode` (up to the first EOS of each row) as a string tensor."""
        return self._decode_tf(ids)

    def _decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: pad/eos dropped, sentinels shown as `<extra_id_N>`."""
        out, run = [], []
        for token_id in (int(i) for i in ids):
            if token_id in (PAD_ID, EOS_ID):
                continue
            if self.is_sentinel(token_id):
                out.append(self._pieces_to_text(run))
                out.append(sentinel_name(self.vocab_size - 1 - token_id))
                run = []
            else:
                run.append(token_id)
        out.append(self._pieces_to_text(run))
        return "".join(out)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(text) -> np.ndarray:
            value = np.asarray(text).item()
            value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            return np.asarray(self._encode(value), dtype=np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(array: np.ndarray) -> np.ndarray:
            # Rows counted explicitly: reshape(-1, 0) is ambiguous for zero-length ids.
            rows = array.reshape(1, 1) if array.ndim == 0 else array.reshape(
                int(np.prod(array.shape[:-1], dtype=np.int64)), array.shape[-1])
            texts = [self.decode(row).encode("utf-8") for row in rows]
            return np.asarray(texts, dtype=object).reshape(array.shape[:-1])

        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text


class SentencePieceVocabulary(Cpm2Vocabulary):
    """jieba + sentencepiece: each jieba word is split on its own, so no piece crosses a word.

    The model is trained on one word a line with no dummy prefix, so pieces carry no '▁'
    word marker and cost no extra tokens; real spaces are '▂' pieces. Decoding concatenates
    the pieces and restores the placeholders: an exact round trip.
    """

    def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100, normalize: bool = False):
        self._model_file = str(model_file)
        self._processor = None
        self.normalize = normalize  # full-width -> half-width first (`half_width`), as the released tokenizer
        super().__init__(extra_ids=extra_ids)

    @property
    def model_file(self) -> str:
        return self._model_file

    @property
    def processor(self):
        if self._processor is None:
            import sentencepiece as spm

            if not pathlib.Path(self._model_file).is_file():
                raise ConfigError(f"sentencepiece model not found: {self._model_file}")
            processor = spm.SentencePieceProcessor(model_file=self._model_file)
            ids = (processor.pad_id(), processor.eos_id(), processor.unk_id())
            if ids != (PAD_ID, EOS_ID, UNK_ID) or processor.id_to_piece(SEP_ID) != SEP_PIECE:
                raise ConfigError(
                    f"{self._model_file}: expected pad/eos/unk/<sep> at 0/1/2/3, got {ids} and "
                    f"{processor.id_to_piece(SEP_ID)!r}; train it with `cpm2 vocab train`"
                )
            self._processor = processor
        return self._processor

    @property
    def _base_vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def _encode_text(self, s: str) -> list[int]:
        words = segment_words(half_width(s) if self.normalize else s)
        return [i for word_ids in self.processor.encode(words, out_type=int) for i in word_ids]

    def _pieces_to_text(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return restore_whitespace(self.processor.decode(list(ids)))

    def pieces(self) -> list[str]:
        """Every piece in id order, sentinels (as `<extra_id_N>`) included."""
        base = [self.processor.id_to_piece(i) for i in range(self._base_vocab_size)]
        return base + [sentinel_name(self.extra_ids - 1 - k) for k in range(self.extra_ids)]

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, SentencePieceVocabulary)
            and self._model_file == other._model_file
            and self.extra_ids == other.extra_ids
            and self.normalize == other.normalize
        )

    def __hash__(self) -> int:
        return hash((self._model_file, self.extra_ids, self.normalize))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_processor"] = None
        return state

    def extended(self, new_pieces: Iterable[str], model_file: str | os.PathLike,
                 extra_ids: int | None = None) -> tuple["SentencePieceVocabulary", "VocabularyExtension"]:
        """Append `new_pieces` to the model (existing piece ids unchanged); write it to `model_file`."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(pathlib.Path(self._model_file).read_bytes())
        known = {p.piece for p in proto.pieces}
        added = [p for p in dict.fromkeys(new_pieces) if p and p not in known]
        floor = min(p.score for p in proto.pieces if p.type == p.NORMAL) - 1.0
        for piece in added:
            proto.pieces.add(piece=piece, score=floor, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
        pathlib.Path(model_file).write_bytes(proto.SerializeToString())
        extended = SentencePieceVocabulary(model_file, self.extra_ids if extra_ids is None else extra_ids,
                                           normalize=self.normalize)
        return extended, describe_extension(self.pieces(), extended.pieces(), self.extra_ids, extended.extra_ids)


@dataclasses.dataclass(frozen=True)
class VocabularyExtension:
    """What a vocabulary extension did, for knowledge inheritance (Chinese -> bilingual).

    old_to_new[i]: new id of old id i (identity for pieces; sentinels move to the new end).
    new_ids: ids of the added pieces. inherit_from[k]: old id of the longest prefix of
    new piece k already in the old vocabulary, or -1 (CPM-2 initialises the new embedding
    row from it, or from a random existing row when there is none).
    """

    old_to_new: np.ndarray
    new_ids: np.ndarray
    new_pieces: tuple[str, ...]
    inherit_from: np.ndarray


def describe_extension(old_pieces: Sequence[str], new_pieces: Sequence[str], old_extra: int,
                       new_extra: int) -> VocabularyExtension:
    """Check that `new_pieces` keeps every old piece id, and report new ids and prefixes."""
    old_base, new_base = len(old_pieces) - old_extra, len(new_pieces) - new_extra
    if list(new_pieces[:old_base]) != list(old_pieces[:old_base]):
        raise ConfigError("extension changed the id of an existing piece")
    if new_extra < old_extra:
        raise ConfigError(f"extension drops sentinels: {old_extra} -> {new_extra}")
    old_to_new = np.arange(len(old_pieces), dtype=np.int64)
    # Sentinel k sits at size-1-k in both vocabularies.
    k = np.arange(old_extra)
    old_to_new[len(old_pieces) - 1 - k] = len(new_pieces) - 1 - k
    index = {piece: i for i, piece in enumerate(old_pieces[:old_base])}
    added = tuple(new_pieces[old_base:new_base])
    inherit = []
    for piece in added:
        source = -1
        for end in range(len(piece) - 1, 0, -1):
            if piece[:end] in index:
                source = index[piece[:end]]
                break
        inherit.append(source)
    return VocabularyExtension(
        old_to_new=old_to_new,
        new_ids=np.arange(old_base, new_base, dtype=np.int64),
        new_pieces=added,
        inherit_from=np.asarray(inherit, dtype=np.int64),
    )


class WordPieceVocabulary(Cpm2Vocabulary):
    """The released CPM-2 `vocab.txt`: jieba words split by greedy longest match.

    Ids here follow the project convention, not the file's line order: `<pad>`, `<eod>`,
    `<unk>`, `<sep>` take 0..3, the other pieces follow in file order, and the file's
    sentinels `<s_N>` move to the end (`<s_0>` last). `released_ids` maps each id to its
    line in the file, so embedding rows of a released checkpoint can be permuted to match.
    A character no piece covers becomes `<unk>`, as in the released tokenizer.

    `normalize` (on for a released `vocab.txt`) applies what the released tokenizer does
    before the word-piece match: full-width -> half-width (`half_width`), jieba on the
    text with its real whitespace, then the placeholders (`released_words`). Off, text is
    segmented as by `segment_words` (placeholders first) and kept as it is.
    """

    def __init__(self, pieces: Sequence[str], extra_ids: int = 0,
                 released_ids: Sequence[int] | None = None, max_word_chars: int = 200, normalize: bool = False):
        specials = [PAD_PIECE, EOS_PIECE, UNK_PIECE, SEP_PIECE]
        if list(pieces[:4]) != specials:
            raise ConfigError(f"word-piece list must start with {specials}, got {list(pieces[:4])}")
        self._pieces = list(pieces)
        self._index = {p: i for i, p in enumerate(self._pieces)}
        self._max_len = max(len(p) for p in self._pieces)
        self._max_word_chars = max_word_chars
        self.normalize = normalize
        self.released_ids = np.asarray(
            released_ids if released_ids is not None else np.arange(len(pieces) + extra_ids), np.int64
        )
        super().__init__(extra_ids=extra_ids)

    @classmethod
    def from_vocab_txt(cls, path: str | os.PathLike, extra_ids: int | None = None,
                       normalize: bool = True) -> "WordPieceVocabulary":
        """Load a CPM-2 vocab.txt; `extra_ids` adds sentinels when the file has none; `normalize`
        applies the released tokenizer's full-width -> half-width step (on by default)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"vocab.txt not found: {path}")
        lines = [line.strip("\n").strip() for line in path.read_text(encoding="utf-8").splitlines()]
        line_of = {}
        for number, token in enumerate(lines):
            line_of.setdefault(token, number)
        eos = next((name for name in _RELEASED_EOS_NAMES if name in line_of), None)
        special_lines = [line_of.get(PAD_PIECE, -1), line_of.get(eos, -1) if eos else -1,
                         line_of.get(UNK_PIECE, -1), line_of.get(SEP_PIECE, -1)]
        sentinel_lines = {}
        for token, number in line_of.items():
            if token.startswith(_RELEASED_SENTINEL_PREFIX) and token.endswith(">") and token[3:-1].isdigit():
                sentinel_lines[int(token[3:-1])] = number
        skip = set(special_lines) | set(sentinel_lines.values())
        body = [(token, number) for number, token in enumerate(lines)
                if number not in skip and token and line_of[token] == number]
        pieces = [PAD_PIECE, EOS_PIECE, UNK_PIECE, SEP_PIECE] + [t for t, _ in body]
        released = special_lines + [n for _, n in body]
        n_sentinels = len(sentinel_lines) if extra_ids is None else extra_ids
        if sentinel_lines and sorted(sentinel_lines) != list(range(len(sentinel_lines))):
            raise ConfigError(f"{path}: sentinels <s_N> are not numbered 0..{len(sentinel_lines) - 1}")
        # Sentinel k is the k-th id from the end.
        released += [sentinel_lines.get(k, -1) for k in reversed(range(n_sentinels))]
        return cls(pieces, extra_ids=n_sentinels, released_ids=released, normalize=normalize)

    @property
    def _base_vocab_size(self) -> int:
        return len(self._pieces)

    def pieces(self) -> list[str]:
        return self._pieces + [sentinel_name(self.extra_ids - 1 - k) for k in range(self.extra_ids)]

    def split_word(self, word: str) -> list[int]:
        """Greedy longest-match-first split of one word; an uncovered character -> unk."""
        if len(word) > self._max_word_chars:
            return [UNK_ID]
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._max_len), start, -1):
                token_id = self._index.get(word[start:end])
                if token_id is not None and token_id > SEP_ID:
                    ids.append(token_id)
                    start = end
                    break
            else:
                ids.append(UNK_ID)
                start += 1
        return ids

    def _encode_text(self, s: str) -> list[int]:
        words = released_words(s) if self.normalize else segment_words(s)
        return [i for word in words for i in self.split_word(word)]

    def _pieces_to_text(self, ids: Sequence[int]) -> str:
        return restore_whitespace("".join(self._pieces[i] for i in ids))

    def write_vocab_txt(self, path: str | os.PathLike) -> None:
        """Write in the released format: specials, pieces, then `<s_0>`, `<s_1>`, ..."""
        lines = [PAD_PIECE, "<eod>", UNK_PIECE, SEP_PIECE] + self._pieces[4:]
        lines += [f"<s_{k}>" for k in range(self.extra_ids)]
        pathlib.Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def extended(self, new_pieces: Iterable[str], extra_ids: int | None = None
                 ) -> tuple["WordPieceVocabulary", VocabularyExtension]:
        """Chinese -> bilingual: append `new_pieces`, keep every existing piece id."""
        added = [p for p in dict.fromkeys(new_pieces) if p and p not in self._index]
        extra = self.extra_ids if extra_ids is None else extra_ids
        extended = WordPieceVocabulary(self._pieces + added, extra_ids=extra, normalize=self.normalize)
        return extended, describe_extension(self.pieces(), extended.pieces(), self.extra_ids, extra)

    def __eq__(self, other) -> bool:
        return (isinstance(other, WordPieceVocabulary) and self.pieces() == other.pieces()
                and self.normalize == other.normalize)

    def __hash__(self) -> int:
        return hash((len(self._pieces), self.extra_ids, tuple(self._pieces[:64])))


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int = 8000,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, num_threads: int = 1, seed: int = 0) -> pathlib.Path:
    """Train a sentencepiece model on jieba-segmented `texts`; returns the `.model` path.

    `vocab_size` counts sentencepiece pieces (pad/eos/unk/<sep>/placeholders/bytes
    included); sentinels come on top as `extra_ids` of `SentencePieceVocabulary`.
    Deterministic: the same texts and settings give a byte-identical file (the sampling
    and shuffling of input lines are seeded with `seed`; one training thread, since the
    trainer's multi-threaded EM sums in an order that varies from run to run).
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model_prefix = pathlib.Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as handle:
        lines = 0
        for text in texts:
            # One jieba word a training line: pieces are learnt inside words only.
            words = segment_words(text)
            handle.write("\n".join(words) + "\n")
            lines += len(words)
        corpus = handle.name
    if lines == 0:
        os.unlink(corpus)
        raise ConfigError("no text to train a vocabulary on")
    try:
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            user_defined_symbols=[SEP_PIECE, SPACE_PLACEHOLDER, NEWLINE_PLACEHOLDER],
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2,
            hard_vocab_limit=False,
        )
    except RuntimeError as err:
        raise ConfigError(f"sentencepiece training failed: {err}") from err
    finally:
        os.unlink(corpus)
    model_file = model_prefix.with_suffix(".model")
    _drop_training_paths(model_file)
    return model_file


def _drop_training_paths(model_file: pathlib.Path) -> None:
    """Clear the paths sentencepiece records in the model (a temporary input file, the output
    prefix): the file then depends on the texts and settings alone."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    model_file.write_bytes(proto.SerializeToString())


def load_vocabulary(path: str | os.PathLike, extra_ids: int = 100, normalize: bool | None = None) -> Cpm2Vocabulary:
    """A `.model` file -> SentencePieceVocabulary; a `vocab.txt` -> WordPieceVocabulary.

    `normalize` (the released tokenizer's full-width -> half-width step) defaults to on
    for a released `vocab.txt` and off for a sentencepiece model trained here.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"vocabulary file not found: {path}")
    if path.suffix == ".model":
        return SentencePieceVocabulary(path, extra_ids=extra_ids, normalize=bool(normalize))
    return WordPieceVocabulary.from_vocab_txt(path, normalize=True if normalize is None else normalize)
