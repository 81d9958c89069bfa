"""The detection framework. Public plugin API:
`from l4router.detection import IProtocolDetector, ProtocolDetector, Match, NEED_MORE, NO_MATCH`
(ProtocolDetector: an optional base class that gives the optional members their defaults)."""

from l4router.detection.interface import (
    NEED_MORE,
    NO_MATCH,
    IProtocolDetector,
    Match,
    ProtocolDetector,
    Verdict,
)
from l4router.detection.peek import Peek

__all__ = [
    "IProtocolDetector",
    "Match",
    "NEED_MORE",
    "NO_MATCH",
    "Peek",
    "ProtocolDetector",
    "Verdict",
]
