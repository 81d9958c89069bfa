"""What a forked worker takes from the supervisor instead of finding it again."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.scripts._twistd_unix import ServerOptions

from l4router.twisted_private import only_these_service_makers


def test_twistd_offers_the_supervisors_plugins_without_looking_for_them_again():
    l4router = next(p for p in getPlugins(IServiceMaker) if p.tapname == "l4router")
    assert "_getPlugins" not in ServerOptions.__dict__  # twistd's, inherited from app's
    try:
        only_these_service_makers([l4router])
        options = ServerOptions()
        options.parseOptions(["--nodaemon", "--pidfile=", "l4router", "--list-detectors"])
    except SystemExit as exit:  # --list-detectors prints and exits: the subcommand ran
        assert exit.code == 0
        assert list(options.loadedPlugins) == ["l4router"]  # not twistd's own (web, ftp, ...)
    else:
        raise AssertionError("l4router --list-detectors did not run")
    finally:
        del ServerOptions._getPlugins
    assert len(list(ServerOptions()._getPlugins(IServiceMaker))) > 1  # twistd's own again
