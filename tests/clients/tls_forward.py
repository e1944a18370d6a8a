#!/usr/bin/env python3
"""A TLS front for a plain TCP service: terminates TLS with the test
upstream's certificate and relays bytes to --to (host:port). Prints
"port N" once listening; serves until killed. Used to put the test IdP
behind HTTPS, as real token endpoints are.
"""
import argparse
import asyncio
import ssl

p = argparse.ArgumentParser()
p.add_argument("--to", required=True)
p.add_argument("--cert", required=True)
p.add_argument("--key", required=True)
a = p.parse_args()
host, port = a.to.rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(a.cert, a.key)


async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        w.close()


async def serve(r, w):
    try:
        ur, uw = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    except (OSError, asyncio.TimeoutError):
        w.close()
        return
    await asyncio.gather(pipe(r, uw), pipe(ur, w))


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    print("port %d" % server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
