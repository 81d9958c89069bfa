"""Detector plugins. A third party drops a module into any `l4router/plugins/` folder on
sys.path and `getPlugins(IProtocolDetector, l4router.plugins)` finds it."""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
