"""SOAP over HTTP/1: 1.1 (`text/xml` + `SOAPAction`) and 1.2 (`application/soap+xml`, `action=`)."""

from __future__ import annotations

import re

import attrs

from l4router.parsers.http1 import Request

_ACTION_PARAMETER = re.compile(r';\s*action\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)


@attrs.frozen
class SoapCall:
    version: str
    action: str | None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def soap_call(request: Request) -> SoapCall | None:
    """The SOAP version and action of an HTTP/1 Request, or None if it is not SOAP."""
    if request.method != "POST":
        return None
    content_type = request.header("content-type")
    kind = media_type(content_type)
    if kind == "application/soap+xml":
        match = _ACTION_PARAMETER.search(content_type or "")
        action = None
        if match:
            action = match.group(1) if match.group(1) is not None else match.group(2)
        return SoapCall("1.2", action)
    action = request.header("soapaction")
    if kind == "text/xml" and action is not None:
        return SoapCall("1.1", action.strip().strip('"') or None)
    return None
