"""Finds the installed detector plugins and checks that they keep the contract."""

from twisted.logger import Logger
from twisted.plugin import getPlugins

from l4router.detection.interface import IProtocolDetector

log = Logger()

TRANSPORTS = frozenset({"tcp", "udp"})


def installed_detectors():
    """Every valid detector plugin, one per name (the first found wins)."""
    import l4router.plugins

    found = {}
    for detector in getPlugins(IProtocolDetector, l4router.plugins):
        problem = _contract_problem(detector)
        if problem:
            log.error("Detector plugin {plugin!r} ignored: {problem}", plugin=detector,
                      problem=problem)
        elif detector.name in found:
            log.error("Detector plugin {plugin!r} ignored: the name {name!r} is taken by "
                      "{other!r}", plugin=detector, name=detector.name, other=found[detector.name])
        else:
            found[detector.name] = detector
    return list(found.values())


def _contract_problem(detector):
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


def detectors_for(detectors, transport, protocols=None):
    """The detectors a listener asks: its transport's, restricted to `protocols` when given."""
    selected = [d for d in detectors if transport in d.transports]
    if protocols is not None:
        selected = [d for d in selected if d.name in protocols]
    return selected
