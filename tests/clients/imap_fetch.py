#!/usr/bin/env python3
"""Read a message straight from the upstream Dovecot over IMAPS (XOAUTH2 with a
token from the test IDP), found by Message-ID; wait for it to be delivered.
Writes the raw message (RFC822, as Dovecot serves it) to --out."""
import argparse
import imaplib
import json
import ssl
import sys
import time
import urllib.parse
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("--host", default="localhost")
p.add_argument("--port", type=int, required=True)
p.add_argument("--cafile", required=True)
p.add_argument("--token-url", required=True)
p.add_argument("--client-id", required=True)
p.add_argument("--user", required=True)
p.add_argument("--password", required=True)
p.add_argument("--message-id", required=True)
p.add_argument("--out", required=True)
p.add_argument("--wait", type=float, default=30)
a = p.parse_args()

body = urllib.parse.urlencode({
    "grant_type": "password", "client_id": a.client_id, "username": a.user,
    "password": a.password, "scope": "https://outlook.office.com/IMAP.AccessAsUser.All",
}).encode()
token = json.load(urllib.request.urlopen(a.token_url, body, timeout=10))["access_token"]

ctx = ssl.create_default_context(cafile=a.cafile)
deadline = time.time() + a.wait
while True:
    imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=60)
    imap.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (a.user, token)).encode())
    imap.select("INBOX", readonly=True)
    typ, data = imap.uid("SEARCH", None, "HEADER", "Message-ID", a.message_id)
    uids = data[0].split()
    if uids:
        typ, msg = imap.uid("FETCH", uids[-1], "(BODY.PEEK[])")
        raw = next(part[1] for part in msg if isinstance(part, tuple))
        open(a.out, "wb").write(raw)
        imap.logout()
        sys.exit(0)
    imap.logout()
    if time.time() > deadline:
        sys.exit("message %s not delivered within %ss" % (a.message_id, a.wait))
    time.sleep(0.3)
