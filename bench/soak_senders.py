"""The soak's SMTP devices and its wrong-password logins, on the line
reader and error classes of soak_clients."""
import base64
import random
import re
import time
import threading

from soak_clients import Conn, Imap, Pop3, ProtoError, WireError, imap_quote, short


# ---------------------------------------------------------------- SMTP

def smtp_reply(c, stage):
    """(code, last line) of a possibly multi-line reply."""
    while True:
        ln = c.line()
        if len(ln) < 3 or not ln[:3].isdigit() or (len(ln) > 3 and ln[3:4] not in (b" ", b"-")):
            raise WireError("malformed", f"{stage}: {short(ln)!r}")
        if ln[3:4] != b"-":
            return int(ln[:3]), ln


def smtp_kind(ln):
    m = re.match(rb"(\d{3})[ -](\d\.\d{1,3}\.\d{1,3})?", ln)
    return f"{m.group(1).decode()} {m.group(2).decode() if m.group(2) else ''}".strip() if m else "?"


def smtp_expect(c, stage, want):
    code, ln = smtp_reply(c, stage)
    if code // 100 != want:
        raise ProtoError(f"smtp {stage}: " + smtp_kind(ln), ln)
    return ln


def smtp_auth(c, user, password, stage="AUTH"):
    smtp_expect(c, "greeting", 2)
    c.send(b"EHLO soak.example.test\r\n")
    smtp_expect(c, "EHLO", 2)
    ir = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    c.send(f"AUTH PLAIN {ir}\r\n".encode())
    smtp_expect(c, stage, 2)


def message(msgid, sender, to, device, n, rng):
    body = []
    for i in range(rng.randint(5, 400)):
        body.append(f"{device} message {n} line {i} " + "x" * rng.randint(0, 70))
        if rng.random() < 0.05:
            body.append(".a line that starts with a dot")
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: soak {device} {n}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: {msgid}\r\nX-Soak-Device: {device}\r\n\r\n")
    return head + "\r\n".join(body) + "\r\n"


class SmtpSender(threading.Thread):
    """One message per session every ~`every` s, each with its own Message-ID."""

    def __init__(self, name, rec, stop, port, path, user, password, sender, rcpts, every, run_id):
        super().__init__(name=name, daemon=True)
        self.rec, self.stop_ev, self.port, self.path = rec, stop, port, path
        self.user, self.password, self.sender, self.rcpts, self.every = user, password, sender, rcpts, every
        self.run_id = run_id
        self.rng = random.Random(name)

    def run(self):
        n = 0
        while not self.stop_ev.is_set():
            n += 1
            to = self.rcpts[n % len(self.rcpts)]
            msgid = f"<soak-{self.run_id}-{self.name}-{n}@soak.example.test>"
            entry = {"msgid": msgid, "device": self.name, "path": self.path, "to": to, "t": self.rec.now(),
                     "result": "not sent"}
            stage, c = "connect", None
            try:
                c = Conn(self.port)
                stage = "AUTH"
                smtp_auth(c, self.user, self.password)
                self.rec.session(self.name)
                stage = "MAIL"
                c.send(f"MAIL FROM:<{self.sender}>\r\n".encode())
                smtp_expect(c, stage, 2)
                stage = "RCPT"
                c.send(f"RCPT TO:<{to}>\r\n".encode())
                smtp_expect(c, stage, 2)
                stage = "DATA"
                c.send(b"DATA\r\n")
                smtp_expect(c, stage, 3)
                text = message(msgid, self.sender, to, self.name, n, self.rng)
                stuffed = "\r\n".join("." + ln if ln.startswith(".") else ln for ln in text.split("\r\n"))
                entry["result"] = "unknown"  # from here on it may have been taken
                c.send(stuffed.encode() + b".\r\n")
                stage = "end of DATA"
                smtp_expect(c, stage, 2)
                entry["result"] = "acked"
                stage = "QUIT"
                c.send(b"QUIT\r\n")
                smtp_expect(c, stage, 2)
            except ProtoError as e:
                if entry["result"] == "unknown":
                    entry["result"] = "refused"
                self.rec.error(self.name, e, stage)
            except WireError as e:
                self.rec.error(self.name, e, stage)
            if c:
                c.close()
            with self.rec.lock:
                self.rec.smtp.append(entry)
            self.stop_ev.wait(self.every * self.rng.uniform(0.7, 1.3))


# ---------------------------------------------------------------- wrong passwords

class WrongPasswords(threading.Thread):
    """Now and then a login with a wrong password, each from its own loopback
    address (the throttle counts per address) against one of a few accounts
    (and per account): expected is the protocol's failure reply."""

    EXPECTED = {"imap": "imap LOGIN: NO", "pop3": "pop3 PASS: -ERR", "smtp": "smtp AUTH: 535"}

    def __init__(self, rec, stop, ports, logins, every, until=None):
        super().__init__(name="wrong-password", daemon=True)
        self.rec, self.stop_ev, self.ports, self.logins, self.every = rec, stop, ports, logins, every
        self.until = until  # seconds into the run after which it stops trying (None: never)

    def attempt(self, k):
        proto = ("imap", "pop3", "smtp")[k % 3]
        src = f"127.0.1.{k % 250 + 1}"
        user = self.logins[k % len(self.logins)]
        pw = f"wrong-{k}"
        stage = "connect"
        if proto == "imap":
            s = Imap(self.ports["imap"], source=src)
            try:
                stage = "LOGIN"
                s.command(f"LOGIN {imap_quote(user)} {imap_quote(pw)}", stage)
            finally:
                s.c.close()
        elif proto == "pop3":
            p = Pop3(self.ports["pop3"], source=src)
            try:
                p.command(f"USER {user}", "USER")
                p.command(f"PASS {pw}", "PASS")
            finally:
                p.c.close()
        else:
            c = Conn(self.ports["smtp_session"], source=src)
            try:
                smtp_auth(c, user, pw)
            finally:
                c.close()
        # logged in with a wrong password
        raise WireError("accepted", f"{proto} login of {user} with a wrong password succeeded")

    def run(self):
        k = 0
        while not self.stop_ev.wait(self.every):
            if self.until is not None and self.rec.now() >= self.until:
                return
            k += 1
            with self.rec.lock:
                self.rec.wrong["tried"] += 1
            try:
                self.attempt(k)
            except ProtoError as e:
                if any(e.kind.startswith(x) for x in self.EXPECTED.values()):
                    with self.rec.lock:
                        self.rec.wrong["refused_as_expected"] += 1
                else:
                    self.rec.error(self.name, e, "wrong password")
            except WireError as e:
                self.rec.error(self.name, e, "wrong password")
