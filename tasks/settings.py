"""Where the data and the vocabulary are: gin-bindable, with environment-variable defaults.

Order of precedence for the data directory: `set_data_dir()` / gin binding
`cpm2_jax.tasks.settings.configure.data_dir`, then `$CPM2_DATA_DIR`, then
`<repo>/../shared/data` when it exists. For the vocabulary: `set_vocabulary_path()` /
gin `configure.vocabulary`, then `$CPM2_VOCAB` (a sentencepiece `.model` or a CPM-2
`vocab.txt`), then a small vocabulary trained once on the data directory's text (or the
demo corpus) and cached under the user cache directory.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import sys

import gin
import seqio

from cpm2_jax.errors import ConfigError, check_choice

DATA_DIR_ENV, VOCAB_ENV, CACHE_ENV = "CPM2_DATA_DIR", "CPM2_VOCAB", "CPM2_CACHE_DIR"
REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_EXTRA_IDS = 100
AUTO_VOCAB_SIZE = 8000

MALFORMED_ENV = "CPM2_ON_MALFORMED"
MALFORMED_POLICIES = ("skip", "fail")

_overrides: dict[str, str | None] = {"data_dir": None, "vocabulary": None, "on_malformed": None}
_task_dirs: dict[str, str] = {}


@gin.configurable
def configure(data_dir: str | None = None, vocabulary: str | None = None,
              on_malformed: str | None = None, task_dirs: dict | None = None) -> None:
    """Gin entry point: `configure.data_dir = "/data/cpm2"`; call it once after parsing."""
    if data_dir is not None:
        set_data_dir(data_dir)
    if vocabulary is not None:
        set_vocabulary_path(vocabulary)
    if on_malformed is not None:
        set_malformed_policy(on_malformed)
    for name, path in (task_dirs or {}).items():
        set_task_dir(name, path)


def set_malformed_policy(policy: str | None) -> None:
    """'skip' (count and warn, the default) or 'fail' (raise naming file and line)."""
    if policy is not None:
        check_choice("on_malformed", policy, MALFORMED_POLICIES)
    _overrides["on_malformed"] = policy


def malformed_policy() -> str:
    policy = _overrides["on_malformed"] or os.environ.get(MALFORMED_ENV) or "skip"
    check_choice(f"${MALFORMED_ENV}", policy, MALFORMED_POLICIES)
    return policy


def set_task_dir(dataset: str, path: str | os.PathLike | None) -> None:
    """Point one dataset (e.g. 'lcqmc') at its own directory."""
    if path is None:
        _task_dirs.pop(dataset, None)
    else:
        _task_dirs[dataset] = str(path)


def task_dir(dataset: str, task: str, subdir: str | None = None) -> pathlib.Path:
    """A dataset's directory: `set_task_dir`, `$CPM2_DATA_DIR_<DATASET>`, else `<data dir>/<subdir>`."""
    chosen = _task_dirs.get(dataset) or os.environ.get(f"{DATA_DIR_ENV}_{dataset.upper()}")
    if chosen:
        return pathlib.Path(chosen).expanduser()
    root = data_dir(task)
    return root / (dataset if subdir is None else subdir)


def set_data_dir(path: str | os.PathLike | None) -> None:
    _overrides["data_dir"] = None if path is None else str(path)


def set_vocabulary_path(path: str | os.PathLike | None) -> None:
    _overrides["vocabulary"] = None if path is None else str(path)
    _vocabulary_at.cache_clear()


def data_dir(task: str | None = None) -> pathlib.Path:
    """The data directory; a `ConfigError` naming the task when none is set or found."""
    chosen = _overrides["data_dir"] or os.environ.get(DATA_DIR_ENV)
    if chosen:
        return pathlib.Path(chosen).expanduser()
    fallback = REPO.parent / "shared" / "data"
    if fallback.is_dir():
        return fallback
    who = f" for task {task!r}" if task else ""
    raise ConfigError(f"no data directory{who}: set ${DATA_DIR_ENV} or gin configure.data_dir "
                      f"(looked for {fallback})")


def cache_dir() -> pathlib.Path:
    """`$CPM2_CACHE_DIR`, else `$XDG_CACHE_HOME/cpm2_jax`, else `~/.cache/cpm2_jax`."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "cpm2_jax"


def vocabulary_path() -> pathlib.Path:
    """The configured vocabulary file, training the automatic one when none is configured."""
    chosen = _overrides["vocabulary"] or os.environ.get(VOCAB_ENV)
    if chosen:
        return pathlib.Path(chosen).expanduser()
    return auto_vocabulary()


def _corpus_files() -> list[pathlib.Path]:
    """The data dir's zh/en monolingual files the automatic vocabulary is trained on (may be none)."""
    try:
        root = data_dir()
    except ConfigError:
        return []
    return [f for f in (root / "zh_mono.jsonl", root / "en_mono.jsonl") if f.is_file()]


def _corpus_texts(max_chars: int = 4_000_000):
    """Text for the automatic vocabulary: the data dir's zh/en monolingual files, else the demo corpus."""
    files = _corpus_files()
    if not files:
        from cpm2_jax.tasks import demo_corpus

        for pair in demo_corpus.load_pairs():
            yield pair["en"]
            yield pair["zh"]
        return
    for path in files:
        budget = max_chars // len(files)
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = json.loads(line).get("text", "")[:20_000]
                yield text
                budget -= len(text)
                if budget <= 0:
                    break


# Everything besides the text that decides the automatic vocabulary; part of its cache key.
AUTO_VOCAB_SETTINGS = {"recipe": 2, "vocab_size": AUTO_VOCAB_SIZE, "character_coverage": 0.995,
                       "model_type": "unigram", "seed": 0, "max_chars": 4_000_000}


_AUTO_VOCAB_PATHS: dict[str, pathlib.Path] = {}


def auto_vocabulary() -> pathlib.Path:
    """A sentencepiece vocabulary trained once on local text and cached (about a minute).

    Training is deterministic, and the cache key is a SHA-256 of the training text and
    `AUTO_VOCAB_SETTINGS` (`auto_8000_<key>.model`): other data or settings never reuse
    a file trained on something else.
    """
    import hashlib

    from cpm2_jax.tasks import vocabulary

    # The content hash reads the text (~1 s): once per process for unchanged files and settings.
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _corpus_files()]
    memo_key = json.dumps([stats, str(cache_dir()), AUTO_VOCAB_SETTINGS], sort_keys=True)
    known = _AUTO_VOCAB_PATHS.get(memo_key)
    if known is not None and known.is_file():
        return known
    texts = list(_corpus_texts(AUTO_VOCAB_SETTINGS["max_chars"]))
    digest = hashlib.sha256(json.dumps(AUTO_VOCAB_SETTINGS, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    size = AUTO_VOCAB_SETTINGS["vocab_size"]
    target = cache_dir() / "vocab" / f"auto_{size}_{digest.hexdigest()[:16]}.model"
    if not target.is_file():
        print(f"cpm2: no vocabulary configured (${VOCAB_ENV}); training a {size}-piece "
              f"one on local text into {target}", file=sys.stderr)
        # Trained under a temporary name and renamed: a killed run leaves no half-written model.
        partial = target.with_name(f"{target.stem}_partial{os.getpid()}")
        model = vocabulary.train_sentencepiece(
            texts, partial, vocab_size=size,
            character_coverage=AUTO_VOCAB_SETTINGS["character_coverage"],
            model_type=AUTO_VOCAB_SETTINGS["model_type"], seed=AUTO_VOCAB_SETTINGS["seed"])
        os.replace(model, target)
        partial.with_suffix(".vocab").unlink(missing_ok=True)
    _AUTO_VOCAB_PATHS[memo_key] = target
    return target


def vocabulary_spec(extra_ids: int = DEFAULT_EXTRA_IDS) -> dict:
    """What a checkpoint records to reload the configured vocabulary: its file, the file's
    SHA-256, its kind, sentinel count and normalisation (JSON-serialisable)."""
    import hashlib

    path = vocabulary_path()
    resolved = resolved_vocabulary(extra_ids)
    return {"path": str(path.absolute()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "kind": "sentencepiece" if path.suffix == ".model" else "vocab_txt",
            "extra_ids": resolved.extra_ids, "normalize": bool(getattr(resolved, "normalize", False))}


@functools.lru_cache(maxsize=8)
def _vocabulary_at(path: str, extra_ids: int):
    from cpm2_jax.tasks import vocabulary

    return vocabulary.load_vocabulary(path, extra_ids=extra_ids)


def resolved_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS):
    """The configured vocabulary object itself (one per file)."""
    return _vocabulary_at(str(vocabulary_path()), extra_ids)


class ConfiguredVocabulary(seqio.Vocabulary):
    """Stands for the configured vocabulary and resolves it at first use.

    Registered tasks hold this object, so importing the registry neither reads nor trains
    a vocabulary, and tests or binaries can point it elsewhere before the first encode.
    """

    def __init__(self, extra_ids: int = DEFAULT_EXTRA_IDS):
        super().__init__(extra_ids=extra_ids)
        self._requested_extra_ids = extra_ids

    @property
    def resolved(self):
        return resolved_vocabulary(self._requested_extra_ids)

    @property
    def extra_ids(self) -> int:
        return self.resolved.extra_ids

    @property
    def eos_id(self) -> int:
        return self.resolved.eos_id

    @property
    def unk_id(self) -> int:
        return self.resolved.unk_id

    @property
    def bos_id(self):
        return None

    @property
    def sep_id(self) -> int:
        return self.resolved.sep_id

    def sentinel_id(self, index: int) -> int:
        return self.resolved.sentinel_id(index)

    @property
    def _base_vocab_size(self) -> int:
        return self.resolved._base_vocab_size  # pylint: disable=protected-access

    def _encode(self, s):
        return self.resolved._encode(s)  # pylint: disable=protected-access

    def _decode(self, ids):
        return self.resolved._decode(ids)  # pylint: disable=protected-access

    def decode(self, ids):
        return self.resolved.decode(ids)

    def decode_tf(self, ids):
        return self.resolved.decode_tf(ids)

    def _encode_tf(self, s):
        return self.resolved._encode_tf(s)  # pylint: disable=protected-access

    def _decode_tf(self, ids):
        return self.resolved._decode_tf(ids)  # pylint: disable=protected-access


_DEFAULT = {}


def default_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> ConfiguredVocabulary:
    """The one deferred vocabulary object all registered tasks share (mixtures need one)."""
    if extra_ids not in _DEFAULT:
        _DEFAULT[extra_ids] = ConfiguredVocabulary(extra_ids)
    return _DEFAULT[extra_ids]
