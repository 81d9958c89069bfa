"""Real grpcio servers and clients with no generated code: raw-bytes (de)serialisers and
generic handlers, so a service name like helloworld.Greeter needs no .proto compilation."""

import sys
from concurrent import futures

import grpc


def _identity(value):
    return value


def greeter_server(name, service="helloworld.Greeter", port=0):
    """A grpcio server answering `service`/SayHello with `name:` + the request bytes."""

    def say_hello(request, context):
        return name.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler(
        service,
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(
                say_hello, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def say_hello(port, service="helloworld.Greeter", payload=b"hi", timeout=10):
    # An L4 router routes connections: each call gets a connection of its own, not one that
    # gRPC's global subchannel pool kept from an earlier channel to the same address.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(
            f"/{service}/SayHello", request_serializer=_identity, response_deserializer=_identity
        )
        return call(payload, timeout=timeout)


if __name__ == "__main__":  # used by tests/data/capture.py to record a first flight
    say_hello(int(sys.argv[1]), timeout=3)
