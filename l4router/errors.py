"""The error hierarchy: each error carries a message a user can act on."""

import contextlib
import sys
from collections.abc import Iterator


class L4RouterError(Exception):
    """Base of every error l4router raises on purpose."""


@contextlib.contextmanager
def startup_errors_in_one_line() -> Iterator[None]:
    """An L4RouterError that stops start-up (a port in use, a worker that cannot start) is one
    line on the terminal and exit status 1, not a traceback out of twistd."""
    try:
        yield
    except L4RouterError as error:
        # twistd has replaced sys.stderr with a logger by now; the user reads the terminal.
        (sys.__stderr__ or sys.stderr).write(f"l4router: {error}\n")
        raise SystemExit(1) from None


class ConfigError(L4RouterError):
    """The configuration is invalid; carries every problem found, each with its key path."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{path}: {reason}" for path, reason in self.problems))


class BindFailed(L4RouterError):
    """A listening address could not be bound; start-up stops."""


class BackendUnavailable(L4RouterError):
    """No server of a backend could be reached; `reason` labels the metric."""

    def __init__(self, backend, reason, detail=""):
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend {backend!r}: {reason}{': ' + detail if detail else ''}")


class WorkerFailed(L4RouterError):
    """A worker process could not be started; the supervisor stops."""
