"""Finds the installed detector plugins and checks that they keep the contract."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from twisted.plugin import getPlugins

from l4router.detection.interface import IProtocolDetector, ProtocolDetector

log = Logger()

TRANSPORTS = frozenset({"tcp", "udp"})
OPTIONAL_MEMBERS = (
    "first_bytes",
    "fields",
    "detect_truncated",
    "bytes_needed",
    "elicit",
    "rewriter",
)


def installed_detectors() -> list[Any]:
    """Every valid detector plugin, one per name (the first found wins), each complete."""
    import l4router.plugins

    found: dict[str, Any] = {}
    for detector in getPlugins(IProtocolDetector, l4router.plugins):
        problem = _contract_problem(detector)
        if problem:
            log.error(
                "Detector plugin {plugin!r} ignored: {problem}", plugin=detector, problem=problem
            )
        elif detector.name in found:
            log.error(
                "Detector plugin {plugin!r} ignored: the name {name!r} is taken by {other!r}",
                plugin=detector,
                name=detector.name,
                other=found[detector.name],
            )
        else:
            found[detector.name] = complete(detector)
    return list(found.values())


def complete(detector: Any) -> Any:
    """The detector with every member of IProtocolDetector: itself when it has them all (a
    ProtocolDetector has), else a ProtocolDetector that lends it the defaults of the optional
    ones it left out. The router then reads every member directly."""
    if all(hasattr(detector, member) for member in OPTIONAL_MEMBERS):
        return detector
    return _Completed(detector)


class _Completed(ProtocolDetector):
    """A plugin written without the optional members, with their defaults."""

    def __init__(self, detector: Any) -> None:
        self.plugin = detector
        for member in ("name", "transports", "priority", "detect", *OPTIONAL_MEMBERS):
            if hasattr(detector, member):
                setattr(self, member, getattr(detector, member))

    def __repr__(self) -> str:
        return repr(self.plugin)


def _contract_problem(detector: Any) -> str | None:
    name = getattr(detector, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name in ("unknown", "timeout"):
        return f"name must be an identifier other than unknown/timeout, not {name!r}"
    transports = getattr(detector, "transports", None)
    if not isinstance(transports, frozenset) or not transports or not transports <= TRANSPORTS:
        return f"transports must be a non-empty frozenset of 'tcp'/'udp', not {transports!r}"
    priority = getattr(detector, "priority", None)
    if isinstance(priority, bool) or not isinstance(priority, int):
        return f"priority must be an int, not {priority!r}"
    if not callable(getattr(detector, "detect", None)):
        return "it has no detect(peek) method"
    return None


def detectors_for(
    detectors: Iterable[Any], transport: str, protocols: Iterable[str] | None = None
) -> list[Any]:
    """The detectors a listener asks: its transport's, restricted to `protocols` when given."""
    selected = [d for d in detectors if transport in d.transports]
    if protocols is not None:
        selected = [d for d in selected if d.name in protocols]
    return selected
