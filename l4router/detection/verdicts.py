"""Turning a sans-IO parser's answer into a detector's verdict."""

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from l4router.detection.interface import NEED_MORE, NO_MATCH, Match, Verdict
from l4router.parsers import INCOMPLETE

Parsed = TypeVar("Parsed")


def verdict(
    parsed: Parsed,
    fields: Callable[[Parsed], Mapping[str, Any]],
    accept: Callable[[Parsed], bool] | None = None,
) -> Match | Verdict:
    """INCOMPLETE -> NEED_MORE; Invalid or not accepted -> NO_MATCH; else Match(fields(parsed)).

    `fields` maps the parse to the Match fields; None values are left out, so a route on an
    absent field does not match.
    """
    if parsed is INCOMPLETE:
        return NEED_MORE
    if not parsed or (accept is not None and not accept(parsed)):
        return NO_MATCH
    return Match({k: v for k, v in fields(parsed).items() if v is not None})
