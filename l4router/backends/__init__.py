"""Backends: named groups of servers, how one is chosen, and how it is connected."""
