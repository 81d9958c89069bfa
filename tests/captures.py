"""The captured first flights under tests/data/, and what each must be detected as."""

import pathlib

DATA = pathlib.Path(__file__).parent / "data"


def capture(name):
    return (DATA / name).read_bytes()


# file -> (protocol, the fields that must be learnt from it)
EXPECTED = {
    "tls_curl.bin": (
        "tls",
        {"sni": "www.example.com", "alpn": ("h2", "http/1.1"), "tls_version": "1.3"},
    ),
    "tls_openssl_s_client.bin": (
        "tls",
        {"sni": "mail.example.org", "alpn": (), "tls_version": "1.3"},
    ),
    "tls_openssl_s_client_alpn.bin": (
        "tls",
        {"sni": "api.example.net", "alpn": ("h2", "http/1.1")},
    ),
    "tls_openssl_no_sni.bin": ("tls", {"alpn": ()}),
    "tls_openssl_tls12.bin": ("tls", {"sni": "old.example.com", "tls_version": "1.2"}),
    "tls_chromium_pq.bin": (
        "tls",
        {
            "sni": "www.browser.example",
            "alpn": ("h2", "http/1.1"),
            "ech": True,
            "tls_version": "1.3",
        },
    ),
    "tls_python_ssl.bin": (
        "tls",
        {"sni": "py.example.com", "alpn": ("h2", "http/1.1"), "tls_versions": ("1.3", "1.2")},
    ),
    "http1_curl.bin": (
        "http1",
        {
            "method": "GET",
            "path": "/api/v1/items",
            "host": "shop.example.com",
            "http_version": "1.1",
        },
    ),
    "http1_python_post.bin": (
        "http1",
        {"method": "POST", "path": "/submit", "host": "forms.example.com"},
    ),
    "http1_curl_http10.bin": (
        "http1",
        {"method": "GET", "path": "/old", "host": "127.0.0.1", "http_version": "1.0"},
    ),
    "http1_curl_upgrade_h2c.bin": (
        "http1",
        {"upgrade": "h2c", "host": "up.example.com", "user_agent": "curl/7.88.1"},
    ),
    "http1_curl_websocket.bin": ("http1", {"upgrade": "websocket", "path": "/chat"}),
    "h2c_curl.bin": (
        "h2c",
        {"authority": "h2.example.com", "path": "/v2/status", "method": "GET", "scheme": "http"},
    ),
    "grpc_python.bin": (
        "grpc",
        {
            "grpc_service": "helloworld.Greeter",
            "grpc_method": "SayHello",
            "content_type": "application/grpc",
            "method": "POST",
        },
    ),
    "soap11_curl.bin": (
        "soap",
        {
            "soap_version": "1.1",
            "host": "soap.example.com",
            "soap_action": "http://example.com/GetLastTradePrice",
        },
    ),
    "soap12_curl.bin": (
        "soap",
        {"soap_version": "1.2", "soap_action": "urn:weather/GetForecast", "path": "/Weather"},
    ),
    "jsonrpc_http_curl.bin": (
        "jsonrpc",
        {"jsonrpc_method": "eth_blockNumber", "jsonrpc_framing": "http", "host": "rpc.example.com"},
    ),
    "jsonrpc_lsp_initialize.bin": (
        "jsonrpc",
        {"jsonrpc_method": "initialize", "jsonrpc_framing": "content_length"},
    ),
    "jsonrpc_ndjson.bin": ("jsonrpc", {"jsonrpc_method": "subtract", "jsonrpc_framing": "ndjson"}),
    "ssh_openssh.bin": ("ssh", {"ssh_version": "2.0", "ssh_software": "OpenSSH_9.2p1"}),
    "postgres_psql_startup.bin": (
        "postgres",
        {
            "pg_request": "startup",
            "user": "alice",
            "database": "inventory",
            "application_name": "report",
        },
    ),
    "postgres_psql_sslrequest.bin": ("postgres", {"pg_request": "ssl"}),
    "redis_cli.bin": ("redis", {"redis_command": "SET"}),
    "mqtt_mosquitto_pub.bin": (
        "mqtt",
        {"mqtt_version": "3.1.1", "mqtt_client_id": "sensor-42", "mqtt_username": "meter"},
    ),
    "mqtt5_mosquitto_pub.bin": ("mqtt", {"mqtt_version": "5.0", "mqtt_client_id": "sensor-5"}),
    "socks5_curl.bin": ("socks", {"socks_version": "5", "socks_methods": ("none", "gssapi")}),
    "socks4a_curl.bin": (
        "socks",
        {"socks_version": "4a", "socks_host": "www.example.com", "socks_port": 80},
    ),
    "openvpn_tcp_client.bin": ("openvpn", {"openvpn_reset": "v2"}),
    "rdp_connection_request.bin": ("rdp", {"rdp_cookie": "eltons"}),
    "xmpp_client_stream.bin": (
        "xmpp",
        {"xmpp_to": "im.example.com", "xmpp_namespace": "jabber:client"},
    ),
}

# Captures that the grpc capture's elicitation was part of: the router had sent SETTINGS.
ELICITED = {"grpc_python.bin"}

# A capture of a more specific protocol may also be a correct MATCH for a more general one
# (a SOAP POST is HTTP/1); the decision still picks the specific one, asked first.
ALSO_MATCHES = {"soap": {"http1"}, "jsonrpc": {"http1"}, "grpc": {"h2c"}}


def capture_names(protocol=None):
    return [n for n, (p, _) in EXPECTED.items() if protocol is None or p == protocol]
