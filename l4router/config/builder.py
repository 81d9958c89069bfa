"""The whole config: the builder that reads every section, and the entry points that
parse text or load a file."""

from __future__ import annotations

import hashlib

import attrs
import yaml

from l4router.config.backend_parts import BackendParts
from l4router.config.endpoints import _endpoint_type, _workers, listen_description, usable_cores
from l4router.config.listener_parts import ListenerParts
from l4router.config.model import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    LOG_FORMATS,
    LOG_LEVELS,
    SHAREABLE_ENDPOINT_TYPES,
    AdminSettings,
    Config,
    DnsSettings,
    LoggingSettings,
    _FrozenDict,
)
from l4router.config.reader import _MISSING, _Invalid, _Reader
from l4router.config.values import (
    _boolean,
    _dns_servers,
    _file_path,
    _host_names,
    _one_of,
    _positive_duration,
    _positive_int,
    _token,
    parse_duration,
)
from l4router.detection.registry import complete
from l4router.errors import ConfigError


class _Builder(BackendParts, ListenerParts):
    """Turns the raw mapping into a Config, knowing which detectors are installed."""

    def __init__(self, reader, detectors):
        self.reader = reader
        self.warnings = []  # what is valid but surely not meant (a route never reached)
        detectors = [complete(d) for d in detectors]
        self.detectors = {d.name: d for d in detectors}
        declared = [d.fields for d in detectors]
        # A plugin that does not declare its fields may produce any; then field names go unchecked.
        self.known_fields = None
        if declared and all(f is not None for f in declared):
            self.known_fields = set().union(*declared)

    def build(self, raw):
        top = self.reader.section(raw, "")
        if top is None:
            return None
        backends = self.backends(top)
        listeners = self.listeners(top, backends)
        limits = top.get("limits", lambda v: v, {})
        limits_section = self.reader.section(limits, "limits")
        max_connections = None
        if limits_section is not None:
            max_connections = limits_section.get("max_connections", _positive_int, None)
            limits_section.finish()
        shutdown_timeout = top.get("shutdown_timeout", parse_duration, DEFAULT_SHUTDOWN_TIMEOUT)
        admin = self.admin(top)
        logging = self.logging(top)
        workers = self.workers(top, listeners)
        state_file = top.get("state_file", _file_path, None)
        upgrade_socket = top.get("upgrade_socket", _file_path, None)
        dns = self.settings(
            top,
            "dns",
            DnsSettings,
            {"servers": _dns_servers, "timeout": _positive_duration},
            DnsSettings(),
        )
        top.finish()
        return Config(
            listeners=listeners,
            backends=_FrozenDict(backends),
            max_connections=max_connections,
            shutdown_timeout=shutdown_timeout,
            admin=admin,
            logging=logging,
            workers=workers,
            state_file=state_file,
            dns=DnsSettings() if dns is _MISSING else dns,
            upgrade_socket=upgrade_socket,
        )

    def workers(self, top, listeners):
        """`auto` is a worker per usable core, or 1 when a listener's socket cannot be shared
        by workers (unix:); an explicit N > 1 then is an error."""
        workers = top.get("workers", _workers, "auto")
        unshareable = [
            (listener.name, description)
            for listener in listeners
            for description in listener.listen
            if _endpoint_type(description) not in SHAREABLE_ENDPOINT_TYPES
        ]
        if workers == "auto":
            return 1 if unshareable else usable_cores()
        if workers is not _MISSING and workers > 1 and unshareable:
            name, description = unshareable[0]
            self.reader.problem(
                "workers",
                f"{workers} workers each need their own socket, which "
                f"listener {name!r} cannot have on {description!r} "
                "(only tcp, tcp6, udp and systemd addresses): set "
                "workers: 1",
            )
        return 1 if workers is _MISSING else workers

    def admin(self, top):
        raw = top.get("admin", lambda v: v, {})
        section = self.reader.section(raw, "admin")
        if section is None:
            return AdminSettings(())
        listen = section.get("listen", self.admin_listen, ())
        token = section.get("token", _token, None)
        hosts = section.get("hosts", _host_names, ())
        section.finish()
        return AdminSettings(
            () if listen is _MISSING else listen,
            None if token is _MISSING else token,
            () if hosts is _MISSING else hosts,
        )

    @staticmethod
    def admin_listen(value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            raise _Invalid(f"must be an endpoint string or a list of them, not {value!r}")
        # The admin site defaults to loopback: a bare ":9100" does not expose it.
        return tuple(listen_description(v, default_host="127.0.0.1") for v in values)

    def logging(self, top):
        raw = top.get("logging", lambda v: v, {})
        section = self.reader.section(raw, "logging")
        if section is None:
            return LoggingSettings()
        fmt = section.get("format", _one_of(LOG_FORMATS), "text")
        access_log = section.get("access_log", _boolean, True)
        level = section.get("level", _one_of(LOG_LEVELS), "info")
        section.finish()
        if _MISSING in (fmt, access_log, level):
            return LoggingSettings()
        return LoggingSettings(fmt, access_log, level)


def parse_config(text, detectors, source="<string>"):
    """Parse YAML text into a Config, or raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([(f"{source}: {where}", f"not valid YAML: {reason}")]) from None
    reader = _Reader()
    builder = _Builder(reader, list(detectors))
    config = builder.build(raw)
    if reader.problems:
        raise ConfigError(reader.problems)
    config = attrs.evolve(config, warnings=tuple(builder.warnings))
    text = text.encode() if isinstance(text, str) else text
    return attrs.evolve(
        config, source=source, digest=config_digest(text, config.admin.token), text=text
    )


def config_digest(text, token):
    """sha256 of the file with the admin token redacted: the digest is published (metrics,
    status page) and must not let anyone test guesses of the token."""
    if token:
        text = text.replace(token.encode(), b"<redacted>")
    return hashlib.sha256(text).hexdigest()


def load_config(path, detectors, parsed=None):
    """Read and parse a config file; an unreadable file is a ConfigError too. `parsed`: a
    Config already made (with `detectors`) of what may be the same text: then that one."""
    try:
        with open(path, "rb") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror}")]) from None
    if parsed is not None and parsed.text == text:
        return attrs.evolve(parsed, source=str(path))
    return parse_config(text, detectors, source=str(path))
