"""PROXY protocol out: the header a backend gets in front of the stream (`proxy_protocol:
v1 | v2 | {version: v2, tlvs: [...]}`)."""

from l4router.connection.addresses import normalise_host
from l4router.parsers import proxyprotocol


def proxy_header(version, wanted_tlvs, source, source_port, local, fields, unique_id):
    """The header for a client at source:source_port that reached `local` (the listener's
    address); `fields`: what detection found, for the TLVs; UNKNOWN when the families differ
    (a v6 client of a v4 listener, say)."""
    local_host = normalise_host(local.host)
    if (":" in source) != (":" in local_host):
        return proxyprotocol.unknown_header(version)
    if version == "v1":
        return proxyprotocol.v1_header(source, source_port, local_host, local.port)
    return proxyprotocol.v2_header(
        source, source_port, local_host, local.port, tlvs(wanted_tlvs, fields, unique_id)
    )


def tlvs(wanted, fields, unique_id):
    """The v2 TLVs a backend asked for: the detected name (SNI, Host or :authority) as
    PP2_TYPE_AUTHORITY, the client's first ALPN offer, our unique connection id."""
    records = []
    if "authority" in wanted:
        name = fields.get("sni") or fields.get("host") or fields.get("authority")
        if name:
            records.append(proxyprotocol.tlv(proxyprotocol.PP2_TYPE_AUTHORITY, name.encode()))
    if "alpn" in wanted and fields.get("alpn"):
        records.append(proxyprotocol.tlv(proxyprotocol.PP2_TYPE_ALPN, fields["alpn"][0].encode()))
    if "unique_id" in wanted:
        records.append(proxyprotocol.tlv(proxyprotocol.PP2_TYPE_UNIQUE_ID, unique_id.encode()))
    return b"".join(records)
