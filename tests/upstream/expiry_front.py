#!/usr/bin/env python3
"""Session-expiry front for the test upstream (python3 stdlib only).

Exchange Online ends an IMAP session when the access token it logged in with
expires: the client gets `* BYE Session invalidated - AccessTokenExpired` and
is disconnected. Dovecot checks a token only at login. This front sits on
extra ports before Dovecot's IMAPS and POP3S listeners and adds that
behaviour. Per client connection it:

  * terminates TLS with the upstream's server certificate,
  * connects to Dovecot over TLS (verified against the upstream CA),
  * relays bytes both ways with bounded buffers (drain() before each read),
  * reads the bearer token out of the client's XOAUTH2/OAUTHBEARER login and
    the `exp` claim out of its JWT payload (not verified: Dovecot checks the
    token with the IDP),
  * once the server's OK for that login has been relayed, ends the session at
    `exp`, between two server responses:
        IMAP  * BYE Session invalidated - AccessTokenExpired
        POP3  -ERR Session invalidated - AccessTokenExpired
    If no response boundary comes within 60 s of `exp`, it closes without one.

One line per event goes to stderr (start sends it to $S/log/front.log).

  expiry_front.py --imaps 29994:29993 --pop3s 29996:29995 \\
      --cert server.crt --key server.key --ca ca.crt --pidfile front.pid
"""

import argparse
import asyncio
import base64
import binascii
import collections
import json
import os
import re
import signal
import ssl
import sys
import time

HOST = "127.0.0.1"
GOODBYE = {"imap": b"* BYE Session invalidated - AccessTokenExpired\r\n",
           "pop3": b"-ERR Session invalidated - AccessTokenExpired\r\n"}
MECHS = ("XOAUTH2", "OAUTHBEARER")
CHUNK = 32 * 1024          # one read from a socket
READ_LIMIT = 32 * 1024     # StreamReader pauses its socket above 2 x this
WRITE_HIGH = 128 * 1024    # drain() waits while more than this is unsent
WRITE_LOW = 32 * 1024      # so at most ~224 KiB are buffered per direction
MAX_LINE = 64 * 1024       # longest client line parsed for a login
MAX_HEAD = 512             # bytes kept of a server line to read its status
MAX_QUEUE = 1000           # pipelined POP3 commands: more wait until responses come
CONNECT_TIMEOUT = 30       # backend connect + TLS handshake
HANDSHAKE_TIMEOUT = 30     # client TLS handshake
FORCE_AFTER = 60           # seconds after exp without a boundary: close without goodbye
CLOSE_GRACE = 10           # seconds for a graceful TLS close before an abort
IMAP_LITERAL = re.compile(rb"\{(\d{1,12})\+?\}\r?\n\Z")
IMAP_AUTH = re.compile(rb"(\S+) AUTHENTICATE (\S+)(?: (\S+))?\r?\n\Z", re.I)


def log(**fields):
    now = time.time()
    parts = []
    for k, v in fields.items():
        v = "none" if v is None else str(v)[:200]
        quote = not v or any(c in v for c in ' "=\\') or not v.isprintable()
        v = v.replace("\\", "\\\\").replace('"', '\\"')
        v = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in v)
        if quote:
            v = '"%s"' % v
        parts.append("%s=%s" % (k, v))
    sys.stderr.write("%s.%03d %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                       int(now % 1 * 1000), " ".join(parts)))
    sys.stderr.flush()


def num(v):
    """A JSON number claim as int/float, else None (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v) if float(v).is_integer() else v


def b64decode(data):
    data = data.strip()
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def read_sasl(mech, response):
    """(user, claims) from the first SASL response of XOAUTH2 or OAUTHBEARER.

    XOAUTH2:     user=<u>\\x01auth=Bearer <tok>\\x01\\x01
    OAUTHBEARER: n,a=<u>,\\x01host=..\\x01port=..\\x01auth=Bearer <tok>\\x01\\x01
    claims is the JWT payload of <tok>, decoded without verifying; {} if none.
    """
    raw = b64decode(response) or b""
    user = token = None
    fields = raw.split(b"\x01")
    if mech == "OAUTHBEARER":
        for part in fields[0].split(b","):
            if part.startswith(b"a="):
                user = part[2:].replace(b"=2C", b",").replace(b"=3D", b"=")
    for f in fields:
        if f.startswith(b"user="):
            user = f[5:]
        elif f[:12].lower() == b"auth=bearer ":
            token = f[12:].strip()
    claims = {}
    if token and token.count(b".") >= 1:
        seg = token.split(b".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(seg + b"=" * (-len(seg) % 4)))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            claims = {}
    if not isinstance(claims, dict):
        claims = {}
    return (user.decode("utf-8", "replace") if user else None), claims


# ---------------------------------------------------------------------- IMAP
class ImapServerStream:
    """Follows the server's stream to know where a response ends: at a line
    end that is not followed by a literal ({n} at the end of the line)."""

    def __init__(self, on_line):
        self.on_line = on_line   # called with the start of each response line
        self.lit = 0             # literal bytes still to pass
        self.tail = bytearray()  # last bytes of the current line (for {n})
        self.head = bytearray()  # first bytes of the current line
        self.start = True        # the current line starts a response (not after a literal)
        self.mid = False         # a response is partly through

    def at_boundary(self):
        return not self.mid

    def _keep(self, seg):
        if self.start and len(self.head) < MAX_HEAD:
            self.head += seg[:MAX_HEAD - len(self.head)]
        self.tail += seg[-40:]
        del self.tail[:-40]

    def feed(self, data, stop=False):
        """Follow data. With stop: return the index just past the first
        response end in it (None if there is none) and stop there."""
        pos, n = 0, len(data)
        while pos < n:
            if self.lit:
                k = min(self.lit, n - pos)
                self.lit -= k
                pos += k
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._keep(data[pos:])
                self.mid = True
                return None
            self._keep(data[pos:nl + 1])
            pos = nl + 1
            m = IMAP_LITERAL.search(bytes(self.tail))
            head = bytes(self.head) if self.start else None
            self.tail.clear()
            self.head.clear()
            if m:
                self.lit = int(m.group(1))
                self.start = False
                self.mid = True
                continue
            self.start, self.mid = True, False
            if head is not None:
                self.on_line(head)
            if stop:
                return pos
        return None


class ImapClientStream:
    """The client's command lines until the login (literals skipped)."""

    def __init__(self, on_line):
        self.on_line = on_line
        self.buf = bytearray()
        self.lit = 0
        self.cont = False        # the next line continues a command after a literal
        self.broken = False

    def feed(self, data):
        pos, n = 0, len(data)
        while pos < n and not self.broken:
            if self.lit:
                k = min(self.lit, n - pos)
                self.lit -= k
                pos += k
                continue
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            if len(self.buf) + end - pos > MAX_LINE:
                self.broken = True
                return
            self.buf += data[pos:end]
            pos = end
            if nl < 0:
                return
            line = bytes(self.buf)
            self.buf.clear()
            m = IMAP_LITERAL.search(line[-40:])
            if m:
                self.lit = int(m.group(1))
            if not self.cont:
                self.on_line(line)
            self.cont = m is not None


# ---------------------------------------------------------------------- POP3
class Pop3Stream:
    """Both directions of POP3: each client command queues the kind of
    response it gets (single line, multi-line, SASL exchange); the server's
    stream is cut into those responses."""

    def __init__(self, session):
        self.s = session
        self.queue = collections.deque(["single"])  # the greeting
        self.cbuf = bytearray()
        self.cskip = False       # dropping the rest of an over-long client line
        self.sasl_turn = False   # the server sent a challenge: next client line answers it
        self.head = bytearray()
        self.body = False        # inside a multi-line response
        self.btail = b""
        self.mid = False
        self.room = asyncio.Event()  # set while the queue has room for more commands
        self.room.set()

    async def wait_room(self):
        """Flow control for pipelining: read no more commands while MAX_QUEUE
        of them wait for their responses (one read adds at most CHUNK/6)."""
        if len(self.queue) >= MAX_QUEUE:
            self.room.clear()
            await self.room.wait()

    def at_boundary(self):
        return not self.mid

    # client -> server
    def client_feed(self, data):
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            if not self.cskip:
                if len(self.cbuf) + end - pos > MAX_LINE:
                    self.cbuf.clear()
                    self.cskip = True
                else:
                    self.cbuf += data[pos:end]
            pos = end
            if nl < 0:
                return
            line = bytes(self.cbuf)
            self.cbuf.clear()
            self.cskip = False
            self.client_line(line)

    def client_line(self, line):
        if self.sasl_turn:
            self.sasl_turn = False
            self.s.sasl_response(line.rstrip(b"\r\n"))
            return
        words = line.split()
        cmd = words[0].upper() if words else b""
        args = words[1:]
        if cmd == b"AUTH" and args:
            kind = "auth"
            self.s.sasl_begin(args[0], None)
            if len(args) > 1:
                self.s.sasl_response(args[1])
        elif cmd in (b"CAPA", b"RETR", b"TOP", b"AUTH") or (cmd in (b"LIST", b"UIDL") and not args):
            kind = "multi"
        else:
            kind = "single"
        self.queue.append(kind)

    # server -> client
    def feed(self, data, stop=False):
        pos, n = 0, len(data)
        while pos < n:
            if self.body:
                buf = self.btail + data[pos:]
                i = buf.find(b"\n.\r\n")
                if i < 0:
                    self.btail = buf[-3:]
                    return None
                pos += i + 4 - len(self.btail)
                self.body, self.btail, self.mid = False, b"", False
                if stop:
                    return pos
                continue
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            if len(self.head) < MAX_HEAD:
                self.head += data[pos:min(end, pos + MAX_HEAD - len(self.head))]
            pos = end
            if nl < 0:
                self.mid = True
                return None
            line = bytes(self.head)
            self.head.clear()
            self.mid = False
            kind = self.queue[0] if self.queue else "single"
            if kind == "auth" and line.startswith(b"+") and not line.startswith(b"+OK"):
                self.sasl_turn = True        # a challenge: the exchange goes on
            else:
                if self.queue:
                    self.queue.popleft()
                    if len(self.queue) < MAX_QUEUE:
                        self.room.set()
                if kind == "auth":
                    self.s.sasl_result(line.startswith(b"+OK"))
                elif kind == "multi" and line.startswith(b"+OK"):
                    self.body, self.btail, self.mid = True, b"\n", True
                    continue
            if stop:
                return pos
        return None


# ---------------------------------------------------------------------- a session
class Session:
    count = 0

    def __init__(self, front, proto, backend_port, creader, cwriter):
        Session.count += 1
        self.sid = Session.count
        self.front, self.proto, self.backend_port = front, proto, backend_port
        self.cr, self.cw = creader, cwriter
        self.sr = self.sw = None
        self.loop = asyncio.get_running_loop()
        self.sasl = None          # {"mech", "tag", "user", "claims", "want"} while a login runs
        self.auth = None          # {"user", "mech", "exp", "login"} after it succeeded
        self.tracked = True       # False: the stream could not be followed
        self.ended = asyncio.Event()
        self.how = None
        self.abort = False
        self.expiring_since = None  # exp passed, waiting for a response boundary
        self.timers = []
        if proto == "imap":
            self.server = ImapServerStream(self.imap_server_line)
            self.client = ImapClientStream(self.imap_client_line)
            self.client_feed = self.client.feed
        else:
            self.server = self.client = Pop3Stream(self)
            self.client_feed = self.client.client_feed

    async def run(self):
        try:
            self.sr, self.sw = await asyncio.wait_for(asyncio.open_connection(
                HOST, self.backend_port, ssl=self.front.backend_ctx, server_hostname="localhost",
                limit=READ_LIMIT, ssl_handshake_timeout=CONNECT_TIMEOUT), CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
            log(event="error", proto=self.proto, sid=self.sid,
                what="backend %s:%d: %r" % (HOST, self.backend_port, e))
            self.cw.transport.abort()
            return
        for w in (self.cw, self.sw):
            w.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        gate = self.client.wait_room if self.proto == "pop3" else None
        pumps = [asyncio.create_task(self.pump(self.cr, self.sw, self.from_client, "client closed", gate)),
                 asyncio.create_task(self.pump(self.sr, self.cw, self.from_server, "server closed"))]
        try:
            await self.ended.wait()
        finally:
            for t in pumps + self.timers:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await asyncio.gather(self.close(self.cw), self.close(self.sw))

    async def close(self, w):
        if self.abort:
            w.transport.abort()
            return
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), CLOSE_GRACE)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            w.transport.abort()

    async def pump(self, reader, writer, filt, how, gate=None):
        try:
            while self.how is None:
                data = await reader.read(CHUNK)
                if not data:
                    break
                out = filt(data)
                if self.how is not None:
                    return
                writer.write(out)
                await writer.drain()
                if gate is not None:
                    await gate()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        self.end(how)

    def end(self, how, abort=False):
        if self.how is not None:
            return
        self.how, self.abort = how, abort
        if self.auth is not None:
            log(event="end", proto=self.proto, sid=self.sid, user=self.auth["user"], how=how,
                duration_s="%.1f" % (time.time() - self.auth["login"]))
        self.ended.set()

    def untrack(self, why):
        if self.tracked:
            self.tracked = False
            log(event="untracked", proto=self.proto, sid=self.sid, why=why)

    # ---- the two directions
    def from_client(self, data):
        if self.tracked and (self.proto == "pop3" or self.auth is None):
            self.client_feed(data)
            if self.proto == "imap" and self.client.broken:
                self.untrack("client line over %d bytes before the login" % MAX_LINE)
        return data

    def from_server(self, data):
        if not self.tracked:
            return data
        if self.expiring_since is None:
            self.server.feed(data)
            return data
        k = self.server.feed(data, stop=True)
        if k is None:
            return data
        self.goodbye(data[:k])
        return b""

    # ---- the login
    def sasl_begin(self, mech, tag):
        mech = mech.decode("ascii", "replace").upper()
        self.sasl = {"mech": mech, "tag": tag, "user": None, "claims": None, "want": False} \
            if mech in MECHS else None

    def sasl_response(self, response):
        """The first non-empty SASL response carries the token."""
        s = self.sasl
        if s is None or s["claims"] is not None or response in (b"", b"=", b"*"):
            return
        s["user"], s["claims"] = read_sasl(s["mech"], response)

    def imap_client_line(self, line):
        if self.sasl is not None and self.sasl["want"]:
            self.sasl["want"] = False
            return self.sasl_response(line.rstrip(b"\r\n"))
        m = IMAP_AUTH.match(line)
        if m:
            self.sasl_begin(m.group(2), m.group(1))
            if m.group(3) is not None:
                self.sasl_response(m.group(3))

    def imap_server_line(self, head):
        s = self.sasl
        if s is None:
            return
        if head.startswith(b"+"):
            s["want"] = s["claims"] is None   # the client's next line is the SASL response
        elif head.startswith(s["tag"] + b" "):
            status = head[len(s["tag"]) + 1:].split(None, 1)
            self.sasl_result(bool(status) and status[0].upper() == b"OK")

    def sasl_result(self, ok):
        s, self.sasl = self.sasl, None
        if not ok or s is None or self.auth is not None:
            return
        now = time.time()
        claims = s["claims"] or {}
        iat, exp = num(claims.get("iat")), num(claims.get("exp"))
        self.auth = {"user": s["user"], "mech": s["mech"], "exp": exp, "login": now}
        log(event="login", proto=self.proto, sid=self.sid, user=s["user"], mech=s["mech"],
            iat=iat, exp=exp, at="%.3f" % now,
            lifetime_s=None if iat is None or exp is None else exp - iat,
            left_s=None if exp is None else "%.1f" % (exp - now))
        if exp is not None:
            self.timers.append(self.loop.call_later(max(0.0, exp - now), self.expire))

    # ---- the end of the token
    def expire(self):
        if self.how is not None:
            return
        self.expiring_since = time.time()
        if not self.tracked:
            return self.force_close()
        if self.server.at_boundary():
            return self.goodbye(b"")
        self.timers.append(self.loop.call_later(FORCE_AFTER, self.force_close))

    def expired_log(self, goodbye):
        now = time.time()
        log(event="expired", proto=self.proto, sid=self.sid, user=self.auth["user"],
            exp=self.auth["exp"], at="%.3f" % now,
            waited_ms="%.0f" % ((now - self.expiring_since) * 1000), goodbye=goodbye)

    def goodbye(self, rest):
        """rest: the server's bytes up to the boundary, still to be relayed."""
        if self.how is not None:
            return
        self.cw.write(rest + GOODBYE[self.proto])
        self.expired_log("yes")
        self.end("expired")

    def force_close(self):
        if self.how is not None:
            return
        self.expired_log("no")
        self.end("expired", abort=True)


# ---------------------------------------------------------------------- the server
class Front:
    def __init__(self, a):
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_ctx.load_cert_chain(a.cert, a.key)
        self.backend_ctx = ssl.create_default_context(cafile=a.ca)
        self.sessions = set()

    async def handle(self, proto, backend_port, reader, writer):
        s = Session(self, proto, backend_port, reader, writer)
        self.sessions.add(s)
        try:
            await s.run()
        except asyncio.CancelledError:
            writer.transport.abort()
            if s.sw is not None:
                s.sw.transport.abort()
            raise
        except Exception as e:  # one session's bug must not stop the front
            log(event="error", proto=proto, sid=s.sid, what=repr(e))
            writer.transport.abort()
            if s.sw is not None:
                s.sw.transport.abort()
        finally:
            self.sessions.discard(s)


def port_pair(text):
    listen, _, backend = text.partition(":")
    return int(listen), int(backend)


def quiet_handler(loop, ctx):
    """Clients that vanish mid-handshake are normal; log anything else."""
    exc = ctx.get("exception")
    if not isinstance(exc, (OSError, ssl.SSLError, ConnectionError)):
        log(event="error", what=ctx.get("message"), exception=repr(exc))


async def serve(a):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_handler)
    front = Front(a)
    servers = []
    for proto, (listen, backend) in (("imap", a.imaps), ("pop3", a.pop3s)):
        servers.append(await asyncio.start_server(
            lambda r, w, p=proto, b=backend: front.handle(p, b, r, w), HOST, listen,
            ssl=front.server_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT, limit=READ_LIMIT,
            reuse_address=True, backlog=512))
    if a.pidfile:
        with open(a.pidfile + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(a.pidfile + ".tmp", a.pidfile)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log(event="listening", pid=os.getpid(),
        imaps="%d->%d" % a.imaps, pop3s="%d->%d" % a.pop3s)
    await stop.wait()
    log(event="stopping", sessions=len(front.sessions))
    for srv in servers:
        srv.close()
    for s in list(front.sessions):
        s.end("front stopped", abort=True)
    await asyncio.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description="session-expiry front for the test upstream")
    ap.add_argument("--imaps", type=port_pair, required=True, help="LISTEN:DOVECOT ports")
    ap.add_argument("--pop3s", type=port_pair, required=True, help="LISTEN:DOVECOT ports")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--pidfile")
    a = ap.parse_args()
    try:
        asyncio.run(serve(a))
    finally:
        if a.pidfile:
            try:
                with open(a.pidfile) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(a.pidfile)
            except OSError:
                pass
        log(event="stopped", pid=os.getpid())


if __name__ == "__main__":
    main()
