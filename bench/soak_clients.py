"""The soak's devices: small blocking IMAP, POP3 and SMTP clients that read
every byte oxbridge writes and sort whatever goes wrong into a protocol
reply (a tagged NO/BAD, a BYE, -ERR, a 4xx/5xx) or not (a reset, a
timeout, a connection closed without a farewell, a malformed line).

Each device is a thread that loops until the run's stop event is set; what
it sees goes into the shared Record. See soak.py for the run around them.
"""
import base64
import re
import select
import socket
import ssl
import threading
import time

MAX_LINE = 1 << 20  # longer than anything oxbridge or the upstream should write on one line
TIMEOUT = 30  # seconds for any one reply
MAX_MULTILINE = 200_000  # lines of one POP3 listing or message

EXISTS_RE = re.compile(rb"^\* (\d+) EXISTS$")
LITERAL_RE = re.compile(rb"\{(\d+)\+?\}$")
MSGID_RE = re.compile(rb"^message-id:\s*(<[^>\r\n]+>)", re.I | re.M)


class ProtoError(Exception):
    """The server answered in its protocol's terms: NO, BAD, BYE, -ERR, 4xx/5xx."""

    def __init__(self, kind, line):
        super().__init__(kind)
        self.kind = kind
        self.line = line


class WireError(Exception):
    """Anything else: reset, timeout, eof (closed without a farewell), malformed, refused."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def short(b, n=120):
    s = b.decode("utf-8", "replace") if isinstance(b, (bytes, bytearray)) else str(b)
    return s if len(s) <= n else s[:n] + "..."


class Conn:
    """One TCP connection (optionally TLS) with a bounded CRLF line reader."""

    def __init__(self, port, source=None, ca=None, timeout=TIMEOUT):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                           source_address=(source, 0) if source else None)
        except ConnectionRefusedError:
            raise WireError("refused", f"connect to :{port}")
        except socket.timeout:
            raise WireError("timeout", f"connect to :{port}")
        except OSError as e:
            raise WireError("connect", f":{port}: {e}")
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ca:
            try:
                raw = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
            except (OSError, ssl.SSLError) as e:
                raw.close()
                raise WireError("tls", str(e))
        self.sock = raw
        self.buf = bytearray()
        self.timeout = timeout

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            raise WireError("timeout", f"no reply within {timeout} s")
        except ConnectionResetError:
            raise WireError("reset")
        except ssl.SSLError as e:
            raise WireError("tls", str(e))
        except OSError as e:
            raise WireError("oserror", str(e))
        if not d:
            raise WireError("eof", "closed without a farewell")
        self.buf += d

    def line(self, timeout=None):
        """The next line without its CRLF; a line ending in a bare LF is malformed."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                ln = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                if not ln.endswith(b"\r\n"):
                    raise WireError("malformed", f"line not ended by CRLF: {short(ln)!r}")
                return ln[:-2]
            if len(self.buf) > MAX_LINE:
                raise WireError("malformed", f"line over {MAX_LINE} bytes")
            self._fill(timeout or self.timeout)

    def exact(self, n, timeout=None):
        while len(self.buf) < n:
            self._fill(timeout or self.timeout)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def readable(self, secs):
        """True when a line is buffered or bytes arrive within secs."""
        if b"\n" in self.buf or (hasattr(self.sock, "pending") and self.sock.pending()):
            return True
        r, _, _ = select.select([self.sock], [], [], secs)
        return bool(r)

    def send(self, data):
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise WireError("timeout", "send")
        except (BrokenPipeError, ConnectionResetError):
            raise WireError("reset", "send")
        except OSError as e:
            raise WireError("oserror", f"send: {e}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Record:
    """What the devices saw, shared by their threads."""

    def __init__(self, t0):
        self.t0 = t0
        self.lock = threading.Lock()
        self.errors = []  # {t, device, kind, protocol, line, excused}
        self.sessions = {}  # device -> sessions logged in
        self.smtp = []  # {msgid, device, path, to, t, result: acked|refused|unknown}
        self.retrieved = []  # (user, uidl, msgid, how)
        self.imap = {}  # device -> {folder, final_exists, live, sessions, byes}
        self.appended = {}  # folder -> appends with a tagged OK
        self.append_errors = []
        self.wrong = {"tried": 0, "refused_as_expected": 0, "other": {}}
        self.excuse = []  # (from, to, why): windows in which resets are the fault's own doing

    def now(self):
        return round(time.time() - self.t0, 3)

    def error(self, device, e, stage):
        t = time.time()
        proto = isinstance(e, ProtoError)
        why = None
        with self.lock:
            for a, b, w in self.excuse:
                if a <= t <= (b if b is not None else t):
                    why = w
            rec = {"t": round(t - self.t0, 3), "device": device, "stage": stage, "protocol": proto,
                   "kind": e.kind, "line": short(e.line if proto else e.detail, 200),
                   "excused": None if proto else why}
            self.errors.append(rec)
        return rec

    def session(self, device):
        with self.lock:
            self.sessions[device] = self.sessions.get(device, 0) + 1


# ---------------------------------------------------------------- IMAP

def imap_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_kind(ln):
    """'NO [CODE]', 'BAD', 'BYE text' from a tagged or untagged status line."""
    parts = ln.split(b" ", 2)
    word = parts[1].decode(errors="replace") if len(parts) > 1 else "?"
    rest = parts[2] if len(parts) > 2 else b""
    m = re.match(rb"\[([A-Za-z0-9-]+)", rest)
    if m:
        return f"{word} [{m.group(1).decode()}]"
    if word == "BYE":
        return f"BYE {short(rest, 48)}"
    return word


class Imap:
    def __init__(self, port, source=None, ca=None):
        self.c = Conn(port, source=source, ca=ca)
        self.n = 0
        self.exists = None
        self.bye = None
        g = self.c.line()
        if g.startswith(b"* BYE"):
            raise ProtoError("imap greeting: " + imap_kind(g), g)
        if not g.startswith(b"* OK") and not g.startswith(b"* PREAUTH"):
            raise WireError("malformed", f"greeting {short(g)!r}")

    def untagged(self, ln):
        if not (ln.startswith(b"* ") or ln.startswith(b"+")):
            raise WireError("malformed", f"not an IMAP response: {short(ln)!r}")
        m = LITERAL_RE.search(ln)
        if m:  # a literal inside a response: read it and the rest of the line
            self.c.exact(int(m.group(1)))
            self.untagged(b"* " + self.c.line())
            return
        m = EXISTS_RE.match(ln)
        if m:
            self.exists = int(m.group(1))
        if ln.startswith(b"* BYE"):
            self.bye = ln

    def command(self, text, stage, literal=None):
        self.n += 1
        tag = f"s{self.n}".encode()
        if literal is None:
            self.c.send(tag + b" " + text.encode() + b"\r\n")
        else:
            self.c.send(tag + b" " + text.encode() + f" {{{len(literal)}}}\r\n".encode())
            ln = self.read(stage)
            while not ln.startswith(b"+"):
                if ln.startswith(tag + b" "):
                    raise ProtoError(f"imap {stage}: " + imap_kind(ln), ln)
                self.untagged(ln)
                ln = self.read(stage)
            self.c.send(literal + b"\r\n")
        while True:
            ln = self.read(stage)
            if ln.startswith(tag + b" "):
                if ln[len(tag) + 1:].startswith(b"OK"):
                    return ln
                raise ProtoError(f"imap {stage}: " + imap_kind(ln), ln)
            if ln.startswith(b"+"):  # an XOAUTH2 error challenge (direct logins only): answer empty
                self.c.send(b"\r\n")
                continue
            self.untagged(ln)

    def read(self, stage, timeout=None):
        try:
            return self.c.line(timeout)
        except WireError as e:
            if e.kind == "eof" and self.bye is not None:
                raise ProtoError(f"imap {stage}: " + imap_kind(self.bye), self.bye)
            raise

    def logout(self):
        try:
            self.command("LOGOUT", "LOGOUT")
        finally:
            self.c.close()


def xoauth2(user, token):
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


class ImapDevice(threading.Thread):
    """A device on one folder through oxbridge: IDLE, or NOOP every `every` s.
    Keeps its session open; logs in again after an error."""

    def __init__(self, name, rec, stop, port, user, password, folder, mode, every=5.0):
        super().__init__(name=name, daemon=True)
        self.rec, self.stop_ev, self.port = rec, stop, port
        self.user, self.password, self.folder, self.mode, self.every = user, password, folder, mode, every
        self.done = threading.Event()  # set by the run when the appender has stopped: read the last count
        self.state = {"folder": folder, "mode": mode, "final_exists": None, "live": 0, "sessions": 0,
                      "byes": {}}
        rec.imap[name] = self.state

    def run(self):
        while not self.done.is_set():
            s = None
            stage = "connect"
            try:
                s = Imap(self.port)
                stage = "LOGIN"
                s.command(f"LOGIN {imap_quote(self.user)} {imap_quote(self.password)}", stage)
                self.rec.session(self.name)
                self.state["sessions"] += 1
                stage = "SELECT"
                s.command(f"SELECT {imap_quote(self.folder)}", stage)
                seen = s.exists or 0
                if self.mode == "idle":
                    stage = "IDLE"
                    while not self.done.is_set():
                        seen = self.idle(s, seen)
                else:
                    stage = "NOOP"
                    while not self.done.is_set():
                        self.done.wait(self.every)
                        s.command("NOOP", stage)
                        if (s.exists or 0) > seen:
                            self.state["live"] += s.exists - seen
                            seen = s.exists
                stage = "final NOOP"
                s.command("NOOP", stage)
                self.state["final_exists"] = s.exists
                stage = "LOGOUT"
                s.logout()
                return
            except (ProtoError, WireError) as e:
                r = self.rec.error(self.name, e, stage)
                if r["protocol"] and "BYE" in r["kind"]:
                    self.state["byes"][r["kind"]] = self.state["byes"].get(r["kind"], 0) + 1
                if s:
                    s.c.close()
                self.done.wait(2)

    def idle(self, s, seen):
        n = s.n + 1
        s.n = n
        tag = f"s{n}".encode()
        s.c.send(tag + b" IDLE\r\n")
        ln = s.read("IDLE")
        while not ln.startswith(b"+"):
            if ln.startswith(tag + b" "):
                raise ProtoError("imap IDLE: " + imap_kind(ln), ln)
            s.untagged(ln)
            ln = s.read("IDLE")
        started = time.time()
        while not self.done.is_set():
            if time.time() - started > 25 * 60:  # RFC 2177: IDLE again before 29 minutes
                break
            if not s.c.readable(1.0):
                continue
            ln = s.read("IDLE")
            if ln.startswith(tag + b" "):
                raise ProtoError("imap IDLE ended: " + imap_kind(ln), ln)
            s.untagged(ln)
            if s.bye is not None:
                # the BYE is the server's farewell: its connection closes next
                raise ProtoError("imap IDLE: " + imap_kind(s.bye), s.bye)
            if (s.exists or 0) > seen:
                self.state["live"] += s.exists - seen
                seen = s.exists
        s.c.send(b"DONE\r\n")
        while True:
            ln = s.read("DONE")
            if ln.startswith(tag + b" "):
                if not ln[len(tag) + 1:].startswith(b"OK"):
                    raise ProtoError("imap DONE: " + imap_kind(ln), ln)
                return seen
            s.untagged(ln)


class Appender(threading.Thread):
    """Not a device: APPENDs to folders straight at Dovecot (no oxbridge) with an
    hour-long app token, round robin, one every `every` s."""

    def __init__(self, rec, stop, port, ca, token_fn, user, folders, every):
        super().__init__(name=f"appender-{user}", daemon=True)
        self.rec, self.stop_ev, self.port, self.ca = rec, stop, port, ca
        self.token_fn, self.user, self.folders, self.every = token_fn, user, folders, every
        for f in folders:
            rec.appended[f] = 0

    def session(self):
        s = Imap(self.port, ca=self.ca)
        s.command(f"AUTHENTICATE XOAUTH2 {xoauth2(self.user, self.token_fn())}", "AUTHENTICATE")
        return s

    def create(self):
        s = self.session()
        for f in self.folders:
            try:
                s.command(f"CREATE {imap_quote(f)}", "CREATE")
            except ProtoError:
                pass  # there already
        s.logout()

    def run(self):
        s, i, n = None, 0, 0
        while not self.stop_ev.is_set():
            try:
                if s is None:
                    s = self.session()
                f = self.folders[i % len(self.folders)]
                n += 1
                msg = (f"From: {self.user}\r\nTo: {self.user}\r\nSubject: soak append {n}\r\n"
                       f"Message-ID: <append-{n}-{f}@soak.example.test>\r\n\r\nappended {n}\r\n").encode()
                s.command(f"APPEND {imap_quote(f)}", "APPEND", literal=msg)
                with self.rec.lock:
                    self.rec.appended[f] += 1
                i += 1
            except (ProtoError, WireError) as e:
                self.rec.append_errors.append({"t": self.rec.now(), "kind": e.kind, "line": short(str(e))})
                if s:
                    s.c.close()
                s = None
            self.stop_ev.wait(self.every)
        if s:
            try:
                s.logout()
            except (ProtoError, WireError):
                pass


# ---------------------------------------------------------------- POP3

def pop3_kind(ln):
    m = re.match(rb"-ERR (\[[A-Z/-]+\])", ln)
    return "-ERR " + (m.group(1).decode() if m else "")


class Pop3:
    def __init__(self, port, source=None, ca=None):
        self.c = Conn(port, source=source, ca=ca)
        self.ok(self.c.line(), "greeting")

    def ok(self, ln, stage):
        if ln.startswith(b"+OK"):
            return ln
        if ln.startswith(b"-ERR"):
            raise ProtoError(f"pop3 {stage}: " + pop3_kind(ln).strip(), ln)
        if ln.startswith(b"+ "):
            return ln
        raise WireError("malformed", f"{stage}: {short(ln)!r}")

    def command(self, text, stage):
        self.c.send(text.encode() + b"\r\n")
        return self.ok(self.c.line(), stage)

    def multiline(self, stage):
        out = []
        while True:
            ln = self.c.line()
            if ln == b".":
                return out
            out.append(ln[1:] if ln.startswith(b".") else ln)
            if len(out) > MAX_MULTILINE:
                raise WireError("malformed", f"{stage}: over {MAX_MULTILINE} lines")


def msgid_of(lines):
    for ln in lines:
        if not ln:
            break  # end of the header
        m = MSGID_RE.match(ln)
        if m:
            return m.group(1).decode(errors="replace")
    return None


def pop3_drain(p, user, rec, how, delete):
    """UIDL, RETR each (and DELE): record (user, uidl, Message-ID)."""
    p.command("STAT", "STAT")
    p.command("UIDL", "UIDL")
    uidls = []
    for ln in p.multiline("UIDL"):
        parts = ln.split()
        if len(parts) != 2:
            raise WireError("malformed", f"UIDL line {short(ln)!r}")
        uidls.append((int(parts[0]), parts[1].decode()))
    for num, uidl in uidls:
        p.command(f"RETR {num}", "RETR")
        mid = msgid_of(p.multiline("RETR"))
        with rec.lock:
            rec.retrieved.append((user, uidl, mid, how))
        if delete:
            p.command(f"DELE {num}", "DELE")
    return len(uidls)


class Pop3Poller(threading.Thread):
    """Logs in every `every` s: STAT, UIDL, RETR and DELE each message, QUIT."""

    def __init__(self, name, rec, stop, port, user, password, every):
        super().__init__(name=name, daemon=True)
        self.rec, self.stop_ev, self.port = rec, stop, port
        self.user, self.password, self.every = user, password, every

    def run(self):
        while not self.stop_ev.is_set():
            stage, p = "connect", None
            try:
                p = Pop3(self.port)
                stage = "USER"
                p.command(f"USER {self.user}", stage)
                stage = "PASS"
                p.command(f"PASS {self.password}", stage)
                self.rec.session(self.name)
                stage = "poll"
                pop3_drain(p, self.user, self.rec, "device", True)
                stage = "QUIT"
                p.command("QUIT", stage)
            except (ProtoError, WireError) as e:
                self.rec.error(self.name, e, stage)
            if p:
                p.c.close()
            self.stop_ev.wait(self.every)
