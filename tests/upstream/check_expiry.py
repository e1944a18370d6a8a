#!/usr/bin/env python3
"""Proof that the test upstream's session-expiry front behaves like Exchange.

Run against an upstream started with OXB_EXPIRE_SESSIONS=1 (python3 stdlib):

  python3 tests/upstream/check_expiry.py [--only idp-ttl,imap-idle,...]
                                         [--imaps-port N] [--pop3s-port N]

Checks (each prints one PASS/FAIL line; the exit status is 1 if any failed):

  idp-ttl            /ttl-5/oauth2/v2.0/token issues 5 s access tokens, also on
                     refresh; /common keeps the configured access_ttl
  imap-idle          XOAUTH2 with SASL-IR, IDLE: `* BYE Session invalidated -
                     AccessTokenExpired\\r\\n` within 1 s after exp, then EOF
  imap-continuation  OAUTHBEARER with the response after `+`, idle between commands
  pop3-two-line      AUTH XOAUTH2, response on the next line:
                     `-ERR Session invalidated - AccessTokenExpired\\r\\n`, then EOF
  pop3-one-line      AUTH OAUTHBEARER <response>
  imap-big-fetch     a 20 MiB message (APPENDed to the folder oxb-expiry-check through
                     Dovecot's own port, deleted afterwards) is FETCHed from 0.5 s
                     before exp at ~5 MB/s: the literal arrives whole and unchanged,
                     then `)`, then the BYE instead of the tagged OK, then EOF

--imaps-port/--pop3s-port point the session checks elsewhere, e.g. at Dovecot's
own ports, where no goodbye comes and they must fail.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BYE = b"* BYE Session invalidated - AccessTokenExpired\r\n"
POP_ERR = b"-ERR Session invalidated - AccessTokenExpired\r\n"
USER = "alice@example.test"
FOLDER = "oxb-expiry-check"
BIG = 20 * 1024 * 1024
RATE = 5_000_000           # bytes/s the big FETCH is read at
LATE_OK = 1.0              # seconds after exp the goodbye may arrive
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Fail(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Fail(msg)


# ---------------------------------------------------------------- IDP
class Idp:
    def __init__(self, url, password):
        self.url, self.password = url, password

    def post(self, path, form):
        data = urllib.parse.urlencode(form).encode()
        try:
            with HTTP.open(self.url + path, data, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise Fail("IDP %s: HTTP %d %s" % (path, e.code, e.read()[:200]))

    def token(self, tenant="common", **form):
        form = form or {"grant_type": "password", "username": USER, "password": self.password}
        form.setdefault("client_id", "test-client")
        return self.post("/%s/oauth2/v2.0/token" % tenant, form)

    def config(self):
        with HTTP.open(self.url + "/admin/config", timeout=10) as r:
            return json.load(r)


def claims(token):
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def xoauth2(token):
    return base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (USER, token)).encode())


def oauthbearer(token, port):
    return base64.b64encode(("n,a=%s,\x01host=localhost\x01port=%d\x01auth=Bearer %s\x01\x01"
                             % (USER, port, token)).encode())


# ---------------------------------------------------------------- a line-reading TLS client
class Conn:
    def __init__(self, ctx, port, rcvbuf=None):
        raw = socket.socket()
        if rcvbuf:  # a small window, so the server side cannot run far ahead of our reads
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        self.s = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def _more(self, deadline, n=65536):
        left = deadline - time.time()
        if left <= 0:
            raise socket.timeout()
        self.s.settimeout(left)
        data = self.s.recv(n)
        self.buf += data
        return data

    def line(self, deadline, what="a line"):
        while b"\n" not in self.buf:
            try:
                if not self._more(deadline):
                    raise Fail("connection closed while waiting for %s (got %r)" % (what, self.buf[:200]))
            except socket.timeout:
                raise Fail("timed out waiting for %s (got %r)" % (what, self.buf[:200]))
        i = self.buf.index(b"\n") + 1
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exact(self, n, deadline, rate=None, on_first=None):
        """n bytes (into a hash), read at up to `rate` bytes/s."""
        h, got, t0 = hashlib.sha256(), 0, time.time()
        while got < n:
            if not self.buf:
                try:
                    if not self._more(deadline, 16384):
                        raise Fail("connection closed after %d of %d literal bytes" % (got, n))
                except socket.timeout:
                    raise Fail("only %d of %d literal bytes in time" % (got, n))
            if got == 0 and on_first:
                on_first()
            take = self.buf[:n - got]
            self.buf = self.buf[len(take):]
            h.update(take)
            got += len(take)
            if rate:
                ahead = got / rate - (time.time() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        return got, h.hexdigest()

    def eof_within(self, seconds):
        """True if the server closes (TLS close or TCP close) with no more data."""
        deadline = time.time() + seconds
        try:
            while True:
                if self.buf:
                    return False
                if not self._more(deadline):
                    return True
        except (socket.timeout, ssl.SSLError, OSError) as e:
            return not isinstance(e, socket.timeout) and not self.buf

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def imap_tagged(c, tag, deadline):
    """Lines up to the tagged reply; returns (untagged lines, tagged line)."""
    lines = []
    while True:
        ln = c.line(deadline, "the reply to %s" % tag.decode())
        if ln.startswith(tag + b" "):
            return lines, ln
        lines.append(ln)


def wait_goodbye(c, exp, want, checks):
    """The next bytes are exactly `want`, arriving from exp to exp+LATE_OK, then EOF."""
    deadline = exp + LATE_OK + 1.5
    try:
        ln = c.line(deadline, "the goodbye")
    except Fail as e:
        raise Fail("%s (exp was %.1f s ago)" % (e, time.time() - exp))
    t = time.time()
    need(ln == want, "expected %r, got %r" % (want, ln))
    need(exp - 0.05 <= t <= exp + LATE_OK, "goodbye at exp%+.3f s, outside [0, %.1f]" % (t - exp, LATE_OK))
    need(c.eof_within(2), "connection not closed within 2 s after the goodbye")
    checks.append("goodbye at exp%+.3f s, then closed" % (t - exp))


def short_token(up, seconds=5):
    tok = up.idp.token("ttl-%d" % seconds)["access_token"]
    return tok, claims(tok)["exp"]


# ---------------------------------------------------------------- checks
def check_idp_ttl(up):
    notes = []
    r = up.idp.token("ttl-5")
    c = claims(r["access_token"])
    need(r["expires_in"] == 5 and c["exp"] - c["iat"] == 5,
         "ttl-5: expires_in=%s exp-iat=%s" % (r["expires_in"], c["exp"] - c["iat"]))
    need(r.get("refresh_token"), "ttl-5 gave no refresh token")
    r2 = up.idp.token("ttl-5", grant_type="refresh_token", refresh_token=r["refresh_token"])
    c2 = claims(r2["access_token"])
    need(r2["expires_in"] == 5 and c2["exp"] - c2["iat"] == 5,
         "refresh via ttl-5: expires_in=%s" % r2["expires_in"])
    ttl = up.idp.config()["access_ttl"]
    r3 = up.idp.token("common")
    c3 = claims(r3["access_token"])
    need(r3["expires_in"] == ttl and c3["exp"] - c3["iat"] == ttl,
         "/common: expires_in=%s, access_ttl=%s" % (r3["expires_in"], ttl))
    notes.append("ttl-5 -> 5 s, refresh via ttl-5 -> 5 s, /common -> %d s" % ttl)
    return notes


def imap_login(up, c, token, deadline, continuation=False):
    greeting = c.line(deadline, "the greeting")
    need(greeting.startswith(b"* OK"), "greeting %r" % greeting)
    if continuation:
        c.send(b"a1 AUTHENTICATE OAUTHBEARER\r\n")
        plus = c.line(deadline, "the continuation")
        need(plus.startswith(b"+"), "expected '+', got %r" % plus)
        c.send(oauthbearer(token, up.imaps) + b"\r\n")
    else:
        c.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2(token) + b"\r\n")
    _, ok = imap_tagged(c, b"a1", deadline)
    need(ok.startswith(b"a1 OK"), "login: %r" % ok)


def check_imap_idle(up):
    notes = []
    token, exp = short_token(up)
    c = Conn(up.ctx, up.imaps)
    try:
        imap_login(up, c, token, time.time() + 10)
        c.send(b"a2 IDLE\r\n")
        plus = c.line(time.time() + 10, "the IDLE continuation")
        need(plus.startswith(b"+"), "IDLE: %r" % plus)
        notes.append("IDLE at exp-%.1f s" % (exp - time.time()))
        wait_goodbye(c, exp, BYE, notes)
    finally:
        c.close()
    return notes


def check_imap_continuation(up):
    notes = []
    token, exp = short_token(up)
    c = Conn(up.ctx, up.imaps)
    try:
        imap_login(up, c, token, time.time() + 10, continuation=True)
        c.send(b"a2 NOOP\r\n")
        _, ok = imap_tagged(c, b"a2", time.time() + 10)
        need(ok.startswith(b"a2 OK"), "NOOP: %r" % ok)
        notes.append("OAUTHBEARER after '+', NOOP OK at exp-%.1f s" % (exp - time.time()))
        wait_goodbye(c, exp, BYE, notes)
    finally:
        c.close()
    return notes


def check_pop3(up, one_line):
    notes = []
    token, exp = short_token(up)
    c = Conn(up.ctx, up.pop3s)
    try:
        deadline = time.time() + 10
        need(c.line(deadline, "the greeting").startswith(b"+OK"), "no +OK greeting")
        if one_line:
            c.send(b"AUTH OAUTHBEARER " + oauthbearer(token, up.pop3s) + b"\r\n")
        else:
            c.send(b"AUTH XOAUTH2\r\n")
            plus = c.line(deadline, "the continuation")
            need(plus.startswith(b"+") and not plus.startswith(b"+OK"), "expected '+', got %r" % plus)
            c.send(xoauth2(token) + b"\r\n")
        ok = c.line(deadline, "the AUTH reply")
        need(ok.startswith(b"+OK"), "AUTH: %r" % ok)
        c.send(b"STAT\r\n")
        stat = c.line(deadline, "the STAT reply")
        need(stat.startswith(b"+OK"), "STAT: %r" % stat)
        notes.append("%s, STAT OK at exp-%.1f s" % ("AUTH OAUTHBEARER <ir>" if one_line else
                                                   "AUTH XOAUTH2 + response line", exp - time.time()))
        wait_goodbye(c, exp, POP_ERR, notes)
    finally:
        c.close()
    return notes


def big_message():
    head = ("From: alice@example.test\r\nTo: alice@example.test\r\nSubject: expiry check\r\n"
            "Message-ID: <expiry-check@example.test>\r\n\r\n").encode()
    line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_" * 2)[:76] + b"\r\n"
    body = line * ((BIG - len(head)) // len(line))
    msg = head + body
    return msg + b"x" * (BIG - len(msg) - 2) + b"\r\n"


def direct_session(up, fn):
    """fn(conn) on an IMAP session through Dovecot's own port, with a normal token."""
    c = Conn(up.ctx, up.dovecot_imaps)
    try:
        imap_login(up, c, up.idp.token("common")["access_token"], time.time() + 10)
        return fn(c)
    finally:
        c.close()


def check_imap_big_fetch(up):
    notes = []
    msg = big_message()
    digest = hashlib.sha256(msg).hexdigest()

    def setup(c):
        dl = time.time() + 60
        c.send(b"s1 CREATE " + FOLDER.encode() + b"\r\n")
        imap_tagged(c, b"s1", dl)  # NO if it exists
        c.send(b"s2 SELECT " + FOLDER.encode() + b"\r\n")
        lines, ok = imap_tagged(c, b"s2", dl)
        need(ok.startswith(b"s2 OK"), "SELECT %s: %r" % (FOLDER, ok))
        if any(re.match(rb"\* [1-9]\d* EXISTS", ln) for ln in lines):
            c.send(b"s3 STORE 1:* +FLAGS.SILENT (\\Deleted)\r\ns4 EXPUNGE\r\n")
            imap_tagged(c, b"s4", dl)
        c.send(b"s5 APPEND " + FOLDER.encode() + b" {%d}\r\n" % len(msg))
        need(c.line(dl, "the APPEND continuation").startswith(b"+"), "APPEND refused")
        c.send(msg + b"\r\n")
        _, ok = imap_tagged(c, b"s5", dl)
        need(ok.startswith(b"s5 OK"), "APPEND: %r" % ok)
    direct_session(up, setup)
    try:
        token, exp = short_token(up)
        c = Conn(up.ctx, up.imaps, rcvbuf=64 * 1024)
        try:
            dl = time.time() + 10
            imap_login(up, c, token, dl)
            c.send(b"a2 EXAMINE " + FOLDER.encode() + b"\r\n")
            _, ok = imap_tagged(c, b"a2", dl)
            need(ok.startswith(b"a2 OK"), "EXAMINE: %r" % ok)
            start = exp - 0.5
            need(time.time() < start, "login took too long: %.1f s left" % (exp - time.time()))
            time.sleep(max(0.0, start - time.time()))
            c.send(b"a3 FETCH 1 BODY.PEEK[]\r\n")
            dl = time.time() + 60
            first = c.line(dl, "the FETCH response")
            m = re.search(rb"\{(\d+)\}\r\n\Z", first)
            need(first.startswith(b"* 1 FETCH") and m, "FETCH: %r" % first[:200])
            size = int(m.group(1))
            t_first = []
            got, h = c.exact(size, dl, rate=RATE, on_first=lambda: t_first.append(time.time()))
            t_last = time.time()
            need(size == len(msg) and got == size, "literal {%d}, got %d bytes, appended %d"
                 % (size, got, len(msg)))
            need(h == digest, "the fetched message differs from the appended one")
            notes.append("literal {%d} whole and unchanged, read from exp%+.2f s to exp%+.2f s"
                         % (size, t_first[0] - exp, t_last - exp))
            need(t_first[0] < exp < t_last, "the transfer did not span exp: inconclusive")
            close = c.line(dl, "the end of the FETCH response")
            need(close == b")\r\n", "after the literal: %r" % close[:200])
            ln = c.line(dl, "the goodbye")
            t = time.time()
            need(ln == BYE, "after the FETCH response: expected %r, got %r" % (BYE, ln[:200]))
            need(c.eof_within(2), "connection not closed within 2 s after the goodbye")
            notes.append("then ')', then BYE at exp%+.2f s instead of the tagged OK, then closed"
                         % (t - exp))
            waited = front_waited_ms(up, exp)
            if waited is not None:
                need(waited > 0, "front.log says the goodbye did not wait (waited_ms=%d)" % waited)
                notes.append("front.log: waited_ms=%d" % waited)
        finally:
            c.close()
    finally:
        def cleanup(c):
            c.send(b"d1 DELETE " + FOLDER.encode() + b"\r\n")
            imap_tagged(c, b"d1", time.time() + 30)
        direct_session(up, cleanup)
    return notes


def front_waited_ms(up, exp):
    """waited_ms of the last IMAP expiry with this exp in the front's log (None: no log)."""
    if not up.front_log or not os.path.exists(up.front_log):
        return None
    waited = None
    with open(up.front_log, errors="replace") as f:
        for ln in f:
            if "event=expired proto=imap " in ln and " exp=%d " % exp in ln:
                m = re.search(r" waited_ms=(\d+)", ln)
                waited = int(m.group(1)) if m else None
    return waited


CHECKS = {
    "idp-ttl": check_idp_ttl,
    "imap-idle": check_imap_idle,
    "imap-continuation": check_imap_continuation,
    "pop3-two-line": lambda up: check_pop3(up, one_line=False),
    "pop3-one-line": lambda up: check_pop3(up, one_line=True),
    "imap-big-fetch": check_imap_big_fetch,
}


class Upstream:
    def __init__(self, a):
        state = os.environ.get("OXB_UPSTREAM_DIR", "/tmp/oxbridge-upstream").rstrip("/")
        with open(state + "/upstream.json") as f:
            env = json.load(f)
        self.ctx = ssl.create_default_context(cafile=env["UPSTREAM_CA"])
        user_pw = dict(s.split(":", 1) for s in env["UPSTREAM_USERS"].split())
        self.idp = Idp(a.idp_url or env["IDP_URL"], user_pw[USER])
        self.dovecot_imaps = int(env["IMAPS_PORT"])
        self.imaps = a.imaps_port or int(env.get("EXPIRY_IMAPS_PORT") or 0)
        self.pop3s = a.pop3s_port or int(env.get("EXPIRY_POP3S_PORT") or 0)
        self.front_log = env.get("FRONT_LOG") if not (a.imaps_port or a.pop3s_port) else None


def main():
    ap = argparse.ArgumentParser(description="check the session-expiry front")
    ap.add_argument("--only", help="comma-separated check names: " + ",".join(CHECKS))
    ap.add_argument("--imaps-port", type=int, help="IMAPS port to test (default EXPIRY_IMAPS_PORT)")
    ap.add_argument("--pop3s-port", type=int, help="POP3S port to test (default EXPIRY_POP3S_PORT)")
    ap.add_argument("--idp-url", help="IDP to get tokens from (default IDP_URL)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CHECKS)
    bad = [n for n in names if n not in CHECKS]
    if bad:
        ap.error("unknown checks: %s" % ",".join(bad))
    up = Upstream(a)
    if any(n != "idp-ttl" for n in names) and not (up.imaps and up.pop3s):
        sys.exit("the upstream runs without OXB_EXPIRE_SESSIONS=1 (no EXPIRY_*_PORT); "
                 "give --imaps-port and --pop3s-port")
    failed = 0
    for name in names:
        t0 = time.time()
        try:
            notes = CHECKS[name](up)
            print("PASS %-18s %5.1fs  %s" % (name, time.time() - t0, "; ".join(notes)), flush=True)
        except (Fail, OSError, ssl.SSLError, KeyError, ValueError) as e:
            failed += 1
            print("FAIL %-18s %5.1fs  %s" % (name, time.time() - t0, e), flush=True)
    print("%d of %d checks passed" % (len(names) - failed, len(names)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
