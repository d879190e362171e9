#!/usr/bin/python3
"""A gRPC client of another stack (gRPC C-core through Python's grpcio, Debian python3-grpcio)
for lazypull's interoperability tests (tests/clients.rs).

It sends serialized requests as they are and returns the serialized answers, so the test can
compare them with what lazypull's own client gets. One call per line on stdin, as JSON:
    {"method": "/runtime.v1.ImageService/ListImages", "request": "<hex>", "stream": false}
One answer per line on stdout:
    {"ok": true, "responses": ["<hex>", ...]}   or   {"ok": false, "code": 5, "message": "..."}

Usage: grpc_raw.py SOCKET [AUTHORITY]
AUTHORITY is what the client sends as the HTTP/2 :authority (grpc.default_authority); without
it, grpcio's default for a unix socket ("localhost").
"""
import json
import sys

import grpc


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    options = []
    if len(sys.argv) == 3:
        options.append(("grpc.default_authority", sys.argv[2]))
    channel = grpc.insecure_channel("unix:" + sys.argv[1], options=options)
    for line in sys.stdin:
        if not line.strip():
            continue
        call = json.loads(line)
        request = bytes.fromhex(call["request"])
        try:
            if call.get("stream"):
                rpc = channel.unary_stream(call["method"])
                responses = [r.hex() for r in rpc(request, timeout=120)]
            else:
                rpc = channel.unary_unary(call["method"])
                responses = [rpc(request, timeout=120).hex()]
            answer = {"ok": True, "responses": responses}
        except grpc.RpcError as e:
            answer = {"ok": False, "code": e.code().value[0], "message": e.details() or ""}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
