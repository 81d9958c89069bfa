"""Delayed calls (the reactor's callLater), handled the one way everywhere."""


def cancel(call) -> None:
    """Cancel a delayed call unless it is None, has run or was cancelled already."""
    if call is not None and call.active():
        call.cancel()
