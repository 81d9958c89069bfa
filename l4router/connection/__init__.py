"""The connection path: accept, detect, route, connect, relay, record (TCP and UDP)."""
