"""Log observers for `logging.format` and `logging.level`."""

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile


def make_log_observer(settings, logfile=None, nodaemon=True, worker=None):
    """An observer for twistd to use instead of its default, or None to keep twistd's own.

    `logfile` and `nodaemon` are twistd's options, so --logfile keeps working with JSON. A
    worker's events say which worker wrote them (`worker`, and `[worker-N]` in text).
    """
    if settings.format == "text" and settings.level == "info" and worker is None:
        return None  # twistd's own observer, with its --logfile and --syslog handling
    if logfile == "-" or (not logfile and nodaemon):
        stream = sys.stdout
    else:
        stream = LogFile.fromFullPath(logfile or "twistd.log")
    if settings.format == "json":
        observer = jsonFileLogObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    level = LogLevel.levelWithName(settings.level)
    if worker is not None:
        observer = _tagged(observer, worker)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def _tagged(observer, worker):
    system = f"worker-{worker}"

    def tag(event):
        event["worker"] = worker
        event.setdefault("log_system", system)
        observer(event)

    return tag


def install_log_observer(parent, observer):
    """twistd asks the application for an ILogObserver after makeService: the top service's
    chance to put the configured log format in place of twistd's default one."""
    if observer is not None and hasattr(parent, "setComponent"):
        from twisted.logger import ILogObserver

        parent.setComponent(ILogObserver, observer)
