"""Log observers for `logging.format`: twistd's text observer, or one JSON object a line."""

import sys

from twisted.logger import jsonFileLogObserver
from twisted.python.logfile import LogFile


def make_log_observer(settings, logfile=None, nodaemon=True):
    """An observer for twistd to use instead of its default, or None to keep twistd's text one.

    `logfile` and `nodaemon` are twistd's own options, so --logfile keeps working with JSON.
    """
    if settings.format != "json":
        return None
    if logfile == "-" or (not logfile and nodaemon):
        return jsonFileLogObserver(sys.stdout)
    return jsonFileLogObserver(LogFile.fromFullPath(logfile or "twistd.log"))
