#!/usr/bin/env python3
"""A POP3 client session with Python's poplib, as a mail fetcher would run it.

Modes (--mode):
  login  log in and QUIT; prints {"ok": bool, "error": "..."}
  retr   STAT, LIST, UIDL, find --message-id with TOP n 0, RETR it to --out;
         with --delete, DELE it, QUIT, and check in a new session it is gone
Prints one JSON object; exit 0 on success.
"""
import argparse
import base64
import json
import poplib
import ssl
import sys

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
p.add_argument("--cafile")
p.add_argument("--user", required=True)
p.add_argument("--password", required=True)
p.add_argument("--auth", choices=["USER", "PLAIN"], default="USER")
p.add_argument("--mode", choices=["login", "retr"], required=True)
p.add_argument("--message-id")
p.add_argument("--out")
p.add_argument("--delete", action="store_true")
a = p.parse_args()


def done(ok, **kw):
    print(json.dumps(dict(ok=ok, **kw)))
    sys.exit(0 if ok else 1)


def connect():
    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.tls == "implicit":
        pop = poplib.POP3_SSL(a.host, a.port, context=ctx, timeout=120)
    else:
        pop = poplib.POP3(a.host, a.port, timeout=120)
        if a.tls == "starttls":
            pop.stls(context=ctx)
    if a.auth == "USER":
        pop.user(a.user)
        pop.pass_(a.password)
    else:
        ir = base64.b64encode(("\0%s\0%s" % (a.user, a.password)).encode()).decode()
        pop._shortcmd("AUTH PLAIN " + ir)
    return pop


def find(pop):
    count, _ = pop.stat()
    for n in range(count, 0, -1):
        try:
            _, lines, _ = pop.top(n, 0)
        except poplib.error_proto as e:
            # Another test's session on the same mailbox may have expunged a
            # message since this session's snapshot; Dovecot then answers
            # "-ERR Message N expunged." It is not the message sought.
            if b"expunged" in e.args[0]:
                continue
            raise
        if any(l.lower() == b"message-id: " + a.message_id.encode().lower() for l in lines):
            return n
    return None


try:
    pop = connect()
except poplib.error_proto as e:
    done(False, error=e.args[0].decode("utf-8", "replace"))
except (OSError, ssl.SSLError) as e:
    done(False, error="%s: %s" % (type(e).__name__, e))

if a.mode == "login":
    pop.quit()
    done(True)

count, size = pop.stat()
_, listing, _ = pop.list()
_, uidl, _ = pop.uidl()
assert len(listing) == count == len(uidl), (count, len(listing), len(uidl))
n = find(pop)
if n is None:
    done(False, error="message not found")
_, lines, octets = pop.retr(n)
# poplib strips CRLF and un-stuffs dots; put the CRLFs back.
open(a.out, "wb").write(b"".join(l + b"\r\n" for l in lines))
if a.delete:
    pop.dele(n)
pop.quit()
if a.delete:
    pop = connect()
    gone = find(pop) is None
    pop.quit()
    if not gone:
        done(False, error="message still there after DELE")
done(True, count=count, octets=octets)
