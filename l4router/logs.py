"""Log observers for `logging.format` and `logging.level`."""

import sys

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, jsonFileLogObserver,
    textFileLogObserver)
from twisted.python.logfile import LogFile


def make_log_observer(settings, logfile=None, nodaemon=True):
    """An observer for twistd to use instead of its default, or None to keep twistd's own.

    `logfile` and `nodaemon` are twistd's options, so --logfile keeps working with JSON.
    """
    if settings.format == "text" and settings.level == "info":
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
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])
