"""Process life: the Service tree, supervisor and workers, sockets, reloads, upgrades, our
reactor."""
