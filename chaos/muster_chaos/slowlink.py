"""A transparent TCP proxy that makes links slow: every chunk is held for a delay (with jitter,
order kept), now and then for a long stall, and connections are now and then reset. It runs
inside one host's network namespace; `Net.slow` sends that host's new connections to chosen
peers through it with an iptables REDIRECT, and resets the ones already open, so that they
reconnect through it. Its own connections carry a firewall mark the REDIRECT skips.

This is what `tc netem` would do, on a kernel that has no netem: run as
`python slowlink.py --port P --delay-ms D [--jitter-ms J] [--stall-chance C --stall-ms S]
[--reset-after-s R] --seed N`."""

import argparse
import asyncio
import random
import socket
import struct
import time

SO_ORIGINAL_DST = 80
SO_MARK = 36
MARK = 0x4D
CHUNK = 65536


def original_destination(sock):
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


class Link:
    def __init__(self, args, rng):
        self.args = args
        self.rng = rng

    def hold_for(self):
        """How long the next chunk is held, in seconds."""
        a = self.args
        delay = a.delay_ms + self.rng.uniform(-a.jitter_ms, a.jitter_ms)
        if a.stall_chance and self.rng.random() < a.stall_chance:
            delay += a.stall_ms
        return max(0.0, delay) / 1000.0

    async def pipe(self, reader, writer):
        """Copies `reader` to `writer`, each chunk delivered no earlier than its hold and never
        before the chunk read before it."""
        queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                last_due = max(last_due, time.monotonic() + self.hold_for())
                await queue.put((last_due, data or None))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()

    async def serve(self, client_reader, client_writer):
        sock = client_writer.get_extra_info("socket")
        try:
            host, port = original_destination(sock)
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
            upstream.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(upstream, (host, port)), 10)
            server_reader, server_writer = await asyncio.open_connection(sock=upstream)
        except (OSError, asyncio.TimeoutError):
            client_writer.close()
            return
        # One line per connection: the harness counts them, to show the fault took effect.
        print(f"connection {host}:{port}", flush=True)
        pipes = asyncio.gather(self.pipe(client_reader, server_writer), self.pipe(server_reader, client_writer))
        try:
            if self.args.reset_after_s:
                lifetime = self.rng.expovariate(1.0 / self.args.reset_after_s)
                await asyncio.wait_for(pipes, lifetime)
            else:
                await pipes
        except asyncio.TimeoutError:
            # A reset, as a middlebox that drops state would cause: RST both ways.
            for w in (client_writer, server_writer):
                s = w.get_extra_info("socket")
                if s is not None:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ConnectionError):
            pass
        finally:
            pipes.cancel()
            for w in (client_writer, server_writer):
                w.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--stall-chance", type=float, default=0.0)
    parser.add_argument("--stall-ms", type=float, default=0.0)
    parser.add_argument("--reset-after-s", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    link = Link(args, random.Random(args.seed))
    server = await asyncio.start_server(link.serve, "0.0.0.0", args.port, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
