"""Gin at the edge: t5x's flags (--gin_file, --gin_bindings, --gin.NAME=value,
--gin_search_paths) and the configurables the gin files bind.

Gin files come in three tiers (as in t5x): `gin/models/cpm2.gin` (architecture shared by
every size), size files such as `gin/models/cpm2_11b.gin` that only override dimensions,
and run files under `gin/runs/` that declare `%gin.REQUIRED` macros.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import re
from typing import Iterable, Optional, Sequence

import gin

from cpm2_jax.config import ModelConfig, get_config
from cpm2_jax.errors import ConfigError, closest


def _gin_dir() -> pathlib.Path:
    """The gin files: `cpm2_jax/gin` in an installed wheel (package data), else the
    repository's top-level gin/ (an editable install or a checkout)."""
    package = pathlib.Path(__file__).resolve().parent
    installed = package / "gin"
    return installed if installed.is_dir() else package.parent / "gin"


GIN_DIR = _gin_dir()


@gin.configurable(module="cpm2_jax")
def model_config(size: Optional[str] = None, **overrides) -> ModelConfig:
    """The model's ModelConfig: a named size (optional) with every bound field overriding it."""
    base = get_config(size) if size else ModelConfig()
    return base.replace(**overrides) if overrides else base


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --gin_file (repeatable), --gin_bindings (repeatable) and --gin_search_paths;
    --gin.NAME=value flags are collected by `split_gin_dot_flags` before argparse sees them."""
    parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                        help="gin file to parse (repeatable); looked up in --gin_search_paths and gin/")
    parser.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                        help="a gin binding such as 'MODEL_DIR=\"/tmp/run\"' (repeatable)")
    parser.add_argument("--gin_search_paths", default="", metavar="DIRS",
                        help="comma-separated folders in which gin files (and their includes) are looked up")


def split_gin_dot_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates t5x's `--gin.NAME=value` flags (returned as bindings `NAME=value`) from argv."""
    rest, bindings = [], []
    for arg in argv:
        m = re.match(r"^--gin\.([^=]+)=(.*)$", arg, re.S)
        if m:
            bindings.append(f"{m.group(1)} = {m.group(2)}")
        elif arg.startswith("--gin.") and "=" not in arg:
            raise ConfigError(f"flag {arg!r}: expected --gin.NAME=value")
        else:
            rest.append(arg)
    return rest, bindings


def search_paths(extra: str | Iterable[str] = "") -> list[pathlib.Path]:
    if isinstance(extra, str):
        extra = [p for p in extra.split(",") if p]
    return [pathlib.Path(p) for p in extra] + [pathlib.Path.cwd(), GIN_DIR, GIN_DIR.parent]


def _resolve(path: str, paths: Sequence[pathlib.Path]) -> str:
    p = pathlib.Path(path)
    if p.is_file():
        return str(p)
    for base in paths:
        if (base / path).is_file():
            return str(base / path)
    raise ConfigError(f"--gin_file {path!r} not found (searched: {', '.join(str(b) for b in paths)})")


_REGISTERED: dict = {}


def register_once(fn, name: str, module: str):
    """`fn` registered with gin (once per process) as `module.name`, as the binaries' entry
    points are: registered on first use, with gin unlocked, since an earlier parse in the same
    process (a test, a notebook) may have left the config locked."""
    key = f"{module}.{name}"
    if key not in _REGISTERED:
        with gin.unlock_config():
            _REGISTERED[key] = gin.external_configurable(fn, name=name, module=module)
    return _REGISTERED[key]


def call_configured(entry, **kwargs):
    """Calls a gin-configured entry point; gin's wrapping of errors is undone: a CPM2Error
    comes out as its own class with its one paragraph (gin re-raises through an
    "ExceptionProxy" subclass with "In call to configurable" lines appended), and a missing
    required argument becomes a ConfigError saying how to bind it."""
    from cpm2_jax.errors import CPM2Error

    try:
        return entry(**kwargs)
    except CPM2Error as err:
        text = "\n".join(line for line in str(err).splitlines() if not line.startswith("  In call to"))
        cls = type(err)
        while "ExceptionProxy" in getattr(cls.__init__, "__qualname__", ""):
            cls = cls.__mro__[1]
        raise cls(text.strip()) from None
    except TypeError as err:
        if "missing" in str(err) and "required" in str(err):
            raise ConfigError(f"{err}; bind it in a run file or with --gin.NAME=value") from None
        raise


def parse_gin(files: Sequence[str] = (), bindings: Sequence[str] = (), search: str | Iterable[str] = "",
              *, finalize: bool = True) -> None:
    """Clears gin, then parses the files and bindings; errors become one ConfigError naming
    the file or binding at fault (and the closest configurable for an unknown name)."""
    gin.clear_config()
    paths = search_paths(search)
    for p in paths:
        if p.is_dir():
            gin.add_config_file_search_path(str(p))
    resolved = [_resolve(f, paths) for f in files]
    # gin logs an ERROR for every search path an include is not in before it finds it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=finalize)
    except (ValueError, KeyError, IOError, SyntaxError) as err:
        raise ConfigError(_explain_gin_error(err, resolved, bindings)) from None
    finally:
        root.setLevel(level)
    check_macros_are_read(bindings)


def _binding_macros(bindings: Sequence[str]) -> list[str]:
    """Names of the macros the given bindings set (`NAME = value`: no '.' in the name)."""
    names = []
    for binding in bindings:
        for line in str(binding).splitlines():
            m = re.match(r"^\s*([A-Za-z_][\w]*)\s*=", line)
            if m:
                names.append(m.group(1))
    return names


def referenced_macros() -> set[str]:
    """Every macro some parsed binding reads (`%NAME` anywhere in a bound value)."""
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, gin.config.ConfigurableReference):
            if value.selector == "gin.macro":
                found.add("/".join(value.scopes))
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)

    for values in gin.config._CONFIG.values():  # pylint: disable=protected-access
        for value in values.values():
            walk(value)
    return found


def check_macros_are_read(bindings: Sequence[str]) -> None:
    """A macro set by a flag (`--gin.LEARNIN_RATE=1e9`) that no parsed file or binding reads
    is a misspelling (gin would accept it and the run would use the default): a ConfigError
    naming it and the closest macro that is read. Macros that gin files set and this binary
    does not read (a model file's macros under another run file) are left alone."""
    read = referenced_macros()
    for name in _binding_macros(bindings):
        if name not in read:
            raise ConfigError(f"gin: --gin.{name} sets macro {name}, which no gin file or binding of this run reads"
                              f"{closest(name, sorted(read))}; the macros read are {', '.join(sorted(read))}")


def _explain_gin_error(err: Exception, files, bindings) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "%gin.REQUIRED" in text and "not subsequently overridden" in text and required_macros_missing():
        return required_macros_message(required_macros_missing())
    m = re.search(r"No configurable matching '([^']+)'", str(err))
    if m:
        name = m.group(1)
        known = [c.rsplit(".", 1)[-1] for c in _known_configurables()]
        text += closest(name.rsplit(".", 1)[-1], known)
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", str(err))
    if m:
        text += closest(m.group(2), _parameters_of(m.group(1)))
    where = f" in gin files {list(files)}" if files else ""
    if bindings:
        where += f" / bindings {list(bindings)}"
    return f"gin: {text}{where}"


def _parameters_of(name: str) -> list[str]:
    """Parameter names of a registered configurable (for did-you-mean on a misspelt binding)."""
    import inspect

    try:
        fn = gin.config._REGISTRY.get_match(name).wrapped  # pylint: disable=protected-access
        target = fn.__init__ if inspect.isclass(fn) else fn
        return [p for p in inspect.signature(target).parameters if p != "self"]
    except Exception:  # unknown name or a layout this gin version lacks
        return []


def required_macros_missing() -> list[str]:
    """Macros still bound to %gin.REQUIRED after parsing (t5x run files declare them)."""
    missing = []
    for (scope, selector), values in gin.config._CONFIG.items():  # pylint: disable=protected-access
        if selector != "gin.macro":
            continue
        value = values.get("value")
        if getattr(value, "selector", None) == "gin.REQUIRED" or repr(value) == "%gin.REQUIRED":
            missing.append(scope)
    return sorted(missing)


def required_macros_message(missing: Sequence[str], command: str = "") -> str:
    example = " ".join(f"--gin.{name}=..." for name in missing)
    who = f"{command}: " if command else ""
    return (f"{who}required gin macro(s) not set: {', '.join(missing)}. The run file declares them "
            f"%gin.REQUIRED; set each with {example} (or --gin_bindings='NAME = value'), e.g. "
            f"--gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=1000")


def check_required_macros(command: str = "") -> None:
    """One ConfigError listing every REQUIRED macro left unset, with the flag that sets it."""
    missing = required_macros_missing()
    if missing:
        raise ConfigError(required_macros_message(missing, command))


def is_required(value) -> bool:
    """True for the placeholder gin passes when a REQUIRED value was never bound."""
    return value is gin.REQUIRED or repr(value) == "%gin.REQUIRED"


def _known_configurables() -> list[str]:
    registry = getattr(gin.config, "_REGISTRY", {})
    try:
        return [str(k) for k, _ in registry.items()]
    except Exception:  # registry layout differs between gin versions
        return []


def binary_main(prog: str, doc: str, add_flags, run, argv: Optional[Sequence[str]] = None) -> int:
    """The `main` of each gin binary (`python -m cpm2_jax.train|eval|infer`): t5x flags in,
    `run(args)` called, a CPM2Error printed as one line with exit status 2."""
    import sys

    from cpm2_jax.errors import CPM2Error

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_flags(parser)
    name = prog.rsplit(".", 1)[-1]
    try:
        argv, dot = split_gin_dot_flags(argv)
        args = parser.parse_args(argv)
        args.gin_bindings = list(args.gin_bindings) + dot
        return run(args)
    except CPM2Error as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
