"""User-facing errors: raised for bad input, printed by the CLI as one line (no traceback)."""


class CPM2Error(Exception):
    """Base class: the message names the file, key, axis or flag at fault."""


class ConfigError(CPM2Error, ValueError):
    """An unknown size name, a bad gin binding, an inconsistent configuration."""


class ShardingError(CPM2Error, ValueError):
    """A mesh that cannot shard a parameter or batch (an axis that does not divide a dimension)."""


class CheckpointError(CPM2Error, ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


class DataError(CPM2Error, ValueError):
    """A missing data directory or file, or a malformed record."""


def closest(name: str, options) -> str:
    """A ' (did you mean X?)' suffix for the option nearest to `name`, or ''."""
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(name: str, value, choices, error: type = None) -> None:
    """Raises `error` (ConfigError by default) naming `name`, the allowed `choices` and the
    value given, unless `value` is one of them (plus a did-you-mean hint for a near miss)."""
    choices = list(choices)
    if value in choices:
        return
    hint = closest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
    raise (error or ConfigError)(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")
