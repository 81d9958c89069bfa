"""Reading a raw mapping while collecting every problem with its key path."""

from __future__ import annotations

from collections.abc import Mapping


class _Invalid(ValueError):
    """A value is wrong; the reader adds the key path."""


_MISSING = object()  # a required key is absent, or a value was invalid (already reported)
_ABSENT = object()  # an optional key is absent


class _Reader:
    """Walks the raw YAML, collecting (path, reason) problems instead of stopping at the first."""

    def __init__(self):
        self.problems = []

    def problem(self, path, reason):
        self.problems.append((path, reason))

    def section(self, raw, path):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problem(path, f"must be a mapping, not {_kind(raw)}")
            return None
        return _Section(self, raw, path)

    def convert(self, value, path, converter):
        try:
            return converter(value)
        except _Invalid as exc:
            self.problem(path, str(exc))
            return _MISSING


class _Section:
    def __init__(self, reader, raw, path):
        self.reader = reader
        self.raw = raw
        self.path = path
        self.used = set()

    def key_path(self, key):
        return f"{self.path}.{key}" if self.path else key

    def has(self, key):
        return key in self.raw

    def get(self, key, converter, default=_MISSING):
        """The converted value, `default` when absent, or _MISSING after a recorded problem."""
        self.used.add(key)
        if key not in self.raw:
            if default is _MISSING:
                self.reader.problem(self.key_path(key), "is required")
            return default
        return self.reader.convert(self.raw[key], self.key_path(key), converter)

    def finish(self):
        for key in self.raw:
            if key not in self.used:
                self.reader.problem(self.key_path(str(key)), "unknown key")


def _kind(value):
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "empty",
    }.get(type(value), type(value).__name__)
