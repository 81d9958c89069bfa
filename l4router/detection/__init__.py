"""The detection framework. Public plugin API:
`from l4router.detection import IProtocolDetector, Match, NEED_MORE, NO_MATCH`."""

from l4router.detection.interface import NEED_MORE, NO_MATCH, IProtocolDetector, Match, Verdict
from l4router.detection.peek import Peek

__all__ = ["IProtocolDetector", "Match", "NEED_MORE", "NO_MATCH", "Peek", "Verdict"]
