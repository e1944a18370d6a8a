#!/usr/bin/env python3
"""A device with an old TLS stack: Python's ssl with the protocol versions
pinned (--tls 1.0|1.1|1.2|1.3), the cipher list of an old printer
(--ciphers, "@SECLEVEL=0" so that OpenSSL 3 still offers TLS 1.0/1.1 and
CBC suites), and no certificate check at all (check_hostname off,
CERT_NONE), as such devices do.

TLS starts at connect (--implicit); else, in script mode, where a step of
the script says ("tls", after it has sent STARTTLS/STLS and read the
answer), and in the other modes after the protocol's (--proto) STARTTLS,
STARTTLS or STLS.

Modes (--mode):
  handshake   the handshake, then the greeting (implicit TLS) and QUIT or
              LOGOUT, answered; nothing else
  script      a dialogue by hand from --script, a JSON list of steps:
                ["send", TEXT]    write TEXT (UTF-8) exactly, no CRLF added
                ["reply"]         read one SMTP reply (all its lines)
                ["line"]          read one line
                ["until", PREFIX] read lines until one starts with PREFIX
                ["tls"]           start TLS on the connection now
              every read is kept, in order, in "transcript"
  imap-fetch  imaplib: LOGIN, SELECT INBOX, find --message-id, FETCH
              BODY.PEEK[] to --out
  pop3-retr   poplib: USER/PASS, find --message-id with TOP n 0 (newest
              first), RETR it to --out (lines joined again with CRLF)

Prints one JSON object last: {"ok", "version" (TLSv1.0 ... TLSv1.3),
"cipher" (OpenSSL's name), "ticket" (handshake mode: the server sent a
session ticket), "cert_sha256" (colon-separated upper-case hex,
as `openssl x509 -fingerprint -sha256` prints it), "cert_der" (hex),
"transcript", "stage", "error"}. Exit 0 on success, 2 when the TLS
handshake failed, 1 on any other failure.
"""
import argparse
import hashlib
import imaplib
import json
import poplib
import socket
import ssl
import sys
import warnings

# TLS 1.0/1.1 are deprecated in Python too; that is the point here.
warnings.filterwarnings("ignore", category=DeprecationWarning)

# How long any single read or the handshake may take.
TIMEOUT_S = 20
# The longest line read by hand.
MAX_LINE = 65536

VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--tls", choices=sorted(VERSIONS), help="pin this TLS version")
p.add_argument("--min", choices=sorted(VERSIONS), help="lowest TLS version offered")
p.add_argument("--max", choices=sorted(VERSIONS), help="highest TLS version offered")
p.add_argument("--ciphers", default="DEFAULT:@SECLEVEL=0")
p.add_argument("--implicit", action="store_true", help="TLS from the first byte")
p.add_argument("--proto", choices=["smtp", "imap", "pop3"], default="smtp")
p.add_argument("--mode", choices=["handshake", "script", "imap-fetch", "pop3-retr"], required=True)
p.add_argument("--script")
p.add_argument("--user")
p.add_argument("--password")
p.add_argument("--message-id")
p.add_argument("--out")
a = p.parse_args()

result = {"ok": False, "transcript": [], "stage": "connect"}


def done(ok, code=None, **kw):
    result.update(kw)
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else (code or 1))


def context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers(a.ciphers)
    low = a.tls or a.min or "1.0"
    high = a.tls or a.max or "1.3"
    ctx.minimum_version = VERSIONS[low]
    ctx.maximum_version = VERSIONS[high]
    return ctx


def note_tls(sock):
    """The negotiated version, suite and the server's certificate."""
    version = sock.version()
    result["version"] = "TLSv1.0" if version == "TLSv1" else version
    result["cipher"] = sock.cipher()[0]
    der = sock.getpeercert(binary_form=True) or b""
    digest = hashlib.sha256(der).hexdigest().upper()
    result["cert_sha256"] = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    result["cert_der"] = der.hex()


def handshake(sock):
    result["stage"] = "handshake"
    try:
        tls = context().wrap_socket(sock, server_hostname=None)
    except (ssl.SSLError, OSError) as e:
        done(False, 2, error="%s: %s" % (type(e).__name__, e))
    note_tls(tls)
    result["stage"] = "session"
    return tls


class Conn:
    """A connection read line by line, with bounds."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def write(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ValueError("line longer than %d bytes" % MAX_LINE)
            chunk = self.sock.recv(4096)
            if not chunk:
                line, self.buf = self.buf, b""
                return line + b"<closed>"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def reply(self):
        """One SMTP reply: lines until one with a space after the code."""
        out = b""
        while True:
            line = self.line()
            out += line
            if line.endswith(b"<closed>") or len(line) < 4 or line[3:4] != b"-":
                return out

    def until(self, prefix):
        out = b""
        while True:
            line = self.line()
            out += line
            if line.startswith(prefix) or line.endswith(b"<closed>"):
                return out

    def start_tls(self):
        if self.buf:
            raise ValueError("bytes after the STARTTLS answer: %r" % self.buf)
        self.sock = handshake(self.sock)


def as_text(b):
    return b.decode("utf-8", errors="backslashreplace")


def starttls_by_hand(conn, proto):
    """The protocol's STARTTLS before a handshake; the answers go to the transcript."""
    t = result["transcript"]
    if proto == "smtp":
        t.append(as_text(conn.reply()))
        conn.write(b"EHLO oldtls.test\r\n")
        t.append(as_text(conn.reply()))
        conn.write(b"STARTTLS\r\n")
        answer = conn.reply()
        ok = answer.startswith(b"220 ")
    elif proto == "imap":
        t.append(as_text(conn.line()))
        conn.write(b"s STARTTLS\r\n")
        answer = conn.until(b"s ")
        ok = answer.splitlines()[-1].startswith(b"s OK")
    else:
        t.append(as_text(conn.line()))
        conn.write(b"STLS\r\n")
        answer = conn.line()
        ok = answer.startswith(b"+OK")
    t.append(as_text(answer))
    if not ok:
        done(False, error="STARTTLS refused: %r" % answer)
    conn.start_tls()


def goodbye(conn, proto):
    """QUIT or LOGOUT after a bare handshake, answered by the server."""
    t = result["transcript"]
    if proto == "smtp":
        if a.implicit:
            t.append(as_text(conn.reply()))
        conn.write(b"QUIT\r\n")
        t.append(as_text(conn.reply()))
    elif proto == "imap":
        if a.implicit:
            t.append(as_text(conn.line()))
        conn.write(b"z LOGOUT\r\n")
        t.append(as_text(conn.until(b"z ")))
    else:
        if a.implicit:
            t.append(as_text(conn.line()))
        conn.write(b"QUIT\r\n")
        t.append(as_text(conn.line()))


def run_script(conn, steps):
    t = result["transcript"]
    for step in steps:
        op = step[0]
        if op == "send":
            conn.write(step[1].encode("utf-8"))
        elif op == "reply":
            t.append(as_text(conn.reply()))
        elif op == "line":
            t.append(as_text(conn.line()))
        elif op == "until":
            t.append(as_text(conn.until(step[1].encode("utf-8"))))
        elif op == "tls":
            conn.start_tls()
        else:
            raise ValueError("unknown step %r" % op)


def imap_fetch():
    ctx = context()
    result["stage"] = "handshake"
    if a.implicit:
        imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=TIMEOUT_S)
    else:
        imap = imaplib.IMAP4(a.host, a.port, timeout=TIMEOUT_S)
        imap.starttls(ssl_context=ctx)
    note_tls(imap.sock)
    result["stage"] = "session"
    imap.login(a.user, a.password)
    imap.select("INBOX", readonly=True)
    typ, data = imap.uid("SEARCH", None, "HEADER", "Message-ID", '"%s"' % a.message_id)
    uids = data[0].split()
    if not uids:
        done(False, error="no message %s" % a.message_id)
    typ, parts = imap.uid("FETCH", uids[-1], "(BODY.PEEK[])")
    body = next(part[1] for part in parts if isinstance(part, tuple))
    open(a.out, "wb").write(body)
    imap.logout()


def pop3_retr():
    ctx = context()
    result["stage"] = "handshake"
    if a.implicit:
        pop = poplib.POP3_SSL(a.host, a.port, context=ctx, timeout=TIMEOUT_S)
    else:
        pop = poplib.POP3(a.host, a.port, timeout=TIMEOUT_S)
        pop.stls(context=ctx)
    note_tls(pop.sock)
    result["stage"] = "session"
    pop.user(a.user)
    pop.pass_(a.password)
    count = pop.stat()[0]
    wanted = ("message-id: %s" % a.message_id).lower().encode()
    for n in range(count, 0, -1):
        head = pop.top(n, 0)[1]
        if any(line.strip().lower() == wanted for line in head):
            lines = pop.retr(n)[1]
            open(a.out, "wb").write(b"\r\n".join(lines) + b"\r\n")
            pop.quit()
            return
    done(False, error="no message %s among %d" % (a.message_id, count))


try:
    if a.mode == "imap-fetch":
        imap_fetch()
    elif a.mode == "pop3-retr":
        pop3_retr()
    else:
        sock = socket.create_connection((a.host, a.port), timeout=TIMEOUT_S)
        if a.implicit:
            sock = handshake(sock)
        conn = Conn(sock)
        result["stage"] = "session"
        if a.mode == "handshake":
            if not a.implicit:
                starttls_by_hand(conn, a.proto)
            goodbye(conn, a.proto)
            # Tickets come after the handshake; the goodbye's reads took them in.
            session = getattr(conn.sock, "session", None)
            result["ticket"] = bool(session is not None and session.has_ticket)
        else:
            run_script(conn, json.load(open(a.script)))
except ssl.SSLError as e:
    code = 2 if result["stage"] == "handshake" else 1
    done(False, code, error="%s: %s" % (type(e).__name__, e))
except (OSError, ValueError, imaplib.IMAP4.error, poplib.error_proto) as e:
    done(False, error="%s: %s" % (type(e).__name__, e))
done(True)
