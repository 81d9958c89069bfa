"""The captured first flights under tests/data/, and what each must be detected as."""

import pathlib

DATA = pathlib.Path(__file__).parent / "data"


def capture(name):
    return (DATA / name).read_bytes()


# file -> (protocol, the fields that must be learnt from it)
EXPECTED = {
    "tls_curl.bin": ("tls", {"sni": "www.example.com", "alpn": ("h2", "http/1.1"),
                             "tls_version": "1.3"}),
    "tls_openssl_s_client.bin": ("tls", {"sni": "mail.example.org", "alpn": (),
                                         "tls_version": "1.3"}),
    "tls_openssl_s_client_alpn.bin": ("tls", {"sni": "api.example.net",
                                              "alpn": ("h2", "http/1.1")}),
    "tls_openssl_no_sni.bin": ("tls", {"alpn": ()}),
    "tls_openssl_tls12.bin": ("tls", {"sni": "old.example.com", "tls_version": "1.2"}),
    "tls_python_ssl.bin": ("tls", {"sni": "py.example.com", "alpn": ("h2", "http/1.1"),
                                   "tls_versions": ("1.3", "1.2")}),
    "http1_curl.bin": ("http1", {"method": "GET", "path": "/api/v1/items",
                                 "host": "shop.example.com", "http_version": "1.1"}),
    "http1_python_post.bin": ("http1", {"method": "POST", "path": "/submit",
                                        "host": "forms.example.com"}),
    "http1_curl_http10.bin": ("http1", {"method": "GET", "path": "/old", "host": "127.0.0.1",
                                        "http_version": "1.0"}),
}
