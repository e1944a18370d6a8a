#!/usr/bin/env python3
"""An IMAP client session with Python's imaplib, as a legacy client would run it.

Modes (--mode):
  login      log in and out; prints {"ok": bool, "error": "..."}
  roundtrip  LIST, SELECT, APPEND --message, find it by Message-ID, FETCH it to
             --out; unless --keep, delete it (STORE \\Deleted, EXPUNGE) and check
             it is gone
  fetch      SELECT, wait for --message-id to arrive, FETCH it to --out; with
             --delete, delete it
  idle       SELECT, IDLE; meanwhile submit --message through SMTP (--smtp-port,
             plain, same credentials); wait for EXISTS, DONE, fetch it to --out
Prints one JSON object; exit 0 on success.
"""
import argparse
import base64
import imaplib
import json
import re
import smtplib
import socket
import ssl
import sys
import threading
import time

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
p.add_argument("--cafile")
p.add_argument("--user", required=True)
p.add_argument("--password", required=True)
p.add_argument("--auth", choices=["LOGIN", "PLAIN"], default="LOGIN")
p.add_argument("--mode", choices=["login", "roundtrip", "fetch", "idle"], required=True)
p.add_argument("--delete", action="store_true")
p.add_argument("--message")
p.add_argument("--message-id")
p.add_argument("--out")
p.add_argument("--keep", action="store_true")
p.add_argument("--smtp-port", type=int)
a = p.parse_args()


def done(ok, **kw):
    print(json.dumps(dict(ok=ok, **kw)))
    sys.exit(0 if ok else 1)


def connect():
    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.tls == "implicit":
        imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=120)
    else:
        imap = imaplib.IMAP4(a.host, a.port, timeout=120)
        if a.tls == "starttls":
            imap.starttls(ssl_context=ctx)
    if a.auth == "LOGIN":
        imap.login(a.user, a.password)
    else:
        imap.authenticate("PLAIN", lambda _: ("\0%s\0%s" % (a.user, a.password)).encode())
    return imap


def find(imap, message_id):
    typ, data = imap.uid("SEARCH", None, "HEADER", "Message-ID", message_id)
    return data[0].split()


def fetch(imap, uid):
    typ, msg = imap.uid("FETCH", uid, "(BODY.PEEK[])")
    return next(part[1] for part in msg if isinstance(part, tuple))


try:
    imap = connect()
except imaplib.IMAP4.error as e:
    done(False, error=str(e))
except (OSError, ssl.SSLError) as e:
    done(False, error="%s: %s" % (type(e).__name__, e))

if a.mode == "login":
    imap.logout()
    done(True)

typ, boxes = imap.list()
assert typ == "OK", boxes
typ, data = imap.select("INBOX")
assert typ == "OK", data

if a.mode == "fetch":
    deadline = time.time() + 30
    uids = find(imap, a.message_id)
    while not uids and time.time() < deadline:
        time.sleep(0.3)
        imap.noop()
        uids = find(imap, a.message_id)
    if not uids:
        done(False, error="message not delivered")
    open(a.out, "wb").write(fetch(imap, uids[0]))
    if a.delete:
        imap.uid("STORE", uids[0], "+FLAGS.SILENT", "(\\Deleted)")
        imap.expunge()
    imap.logout()
    done(True, uid=uids[0].decode())

if a.mode == "roundtrip":
    msg = open(a.message, "rb").read()
    typ, data = imap.append("INBOX", None, None, msg)
    assert typ == "OK", data
    uids = find(imap, a.message_id)
    assert len(uids) == 1, uids
    open(a.out, "wb").write(fetch(imap, uids[0]))
    if not a.keep:
        imap.uid("STORE", uids[0], "+FLAGS.SILENT", "(\\Deleted)")
        imap.expunge()
        assert find(imap, a.message_id) == [], "message still there after EXPUNGE"
    imap.logout()
    done(True, mailboxes=len(boxes), uid=uids[0].decode())

# IDLE: imaplib has no IDLE, so speak it on the socket imaplib holds.
tag = imap._new_tag().decode()
imap.send(("%s IDLE\r\n" % tag).encode())
line = imap.readline()
assert line.startswith(b"+"), line


def submit():
    time.sleep(0.5)
    s = smtplib.SMTP("127.0.0.1", a.smtp_port, timeout=60)
    s.ehlo("device.test")
    s.login(a.user, a.password)
    s.sendmail(a.user, [a.user], open(a.message, "rb").read())
    s.quit()


threading.Thread(target=submit, daemon=True).start()
imap.sock.settimeout(60)
seen = None
deadline = time.time() + 60
while time.time() < deadline:
    line = imap.readline()
    if not line:
        done(False, error="connection closed during IDLE")
    if re.match(rb"\* \d+ EXISTS", line):
        seen = line.strip().decode()
        break
imap.send(b"DONE\r\n")
while True:
    line = imap.readline()
    if line.startswith(tag.encode()):
        assert b" OK" in line, line
        break
if not seen:
    done(False, error="no EXISTS during IDLE")
uids = find(imap, a.message_id)
assert len(uids) == 1, uids
open(a.out, "wb").write(fetch(imap, uids[0]))
imap.logout()
done(True, exists=seen)
