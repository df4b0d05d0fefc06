"""The stack's floor: Sanic and one aiohttp session forwarding a body, and nothing else.

    python -m bench.floor --upstream http://127.0.0.1:8000 --port 0   # prints "listening PORT"

Streams are relayed chunk by chunk as they arrive. No mapping,
no JSON, no header filtering, no timeouts, no logs, no metrics: what any proxy on this stack
(Sanic + aiohttp, one process) pays per request before doing its own work. The benchmark runs
it next to the proxy, so the proxy's own cost is the difference of the two. The pieces of the
proxy it shares are knobs of the stack, so that what they save is not counted as the proxy's
own: Sanic's response with cheap header sanitising and its headers let go of once written
(``service.response``), and the garbage collector set for serving
(``service.lifecycle.tune_collector``).
"""

from __future__ import annotations

import argparse
import socket

import aiohttp
from sanic import Request, Sanic
from sanic.response import HTTPResponse

from service.lifecycle import tune_collector_once_serving
from service.response import Response


def create_app(upstream: str) -> Sanic:
    app = Sanic("bench-floor")

    @app.before_server_start
    async def open_session(app: Sanic) -> None:
        # no pool limit: the benchmark holds 1,000 streams open at once
        app.ctx.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )

    app.after_server_start(tune_collector_once_serving)

    @app.post("/v1/chat/completions")
    async def forward(request: Request) -> HTTPResponse | None:
        query = f"?{request.query_string}" if request.query_string else ""
        async with app.ctx.session.post(
            upstream + "/v1/chat/completions" + query,
            data=request.body,
            headers={"content-type": "application/json"},
        ) as answer:
            if answer.content_type != "text/event-stream":
                body = await answer.read()
                return Response(body, status=answer.status, content_type=answer.content_type)
            response = await request.respond(Response(status=answer.status, content_type="text/event-stream"))
            async for chunk in answer.content.iter_any():
                await response.send(chunk)
            await response.eof()
            return None

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    app = create_app(args.upstream)
    # The proxy's listen backlog (service/cli.py), not Sanic's 100: bursts of new streams overflow it.
    app.run(sock=sock, single_process=True, access_log=False, motd=False, verbosity=0, backlog=1024)


if __name__ == "__main__":
    main()
