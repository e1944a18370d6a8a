#!/usr/bin/env python3
"""List the Message-ID of every message in a user's INBOX on the upstream
Dovecot (IMAPS, XOAUTH2 with a token from the test IDP), one per line, in
mailbox order; duplicates appear as often as they were delivered."""
import argparse
import imaplib
import json
import ssl
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
p.add_argument("--search", default="ALL", help="an IMAP search key, e.g. 'SUBJECT stream'")
a = p.parse_args()

body = urllib.parse.urlencode({
    "grant_type": "password", "client_id": a.client_id, "username": a.user,
    "password": a.password, "scope": "https://outlook.office.com/IMAP.AccessAsUser.All",
}).encode()
token = json.load(urllib.request.urlopen(a.token_url, body, timeout=10))["access_token"]
ctx = ssl.create_default_context(cafile=a.cafile)
imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=60)
imap.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (a.user, token)).encode())
imap.select("INBOX", readonly=True)
typ, data = imap.uid("SEARCH", None, *a.search.split(" ", 1)) if a.search != "ALL" else imap.uid("SEARCH", None, "ALL")
uids = data[0].split()
for start in range(0, len(uids), 500):
    chunk = b",".join(uids[start:start + 500])
    typ, msgs = imap.uid("FETCH", chunk, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    for part in msgs:
        if isinstance(part, tuple):
            value = part[1].decode(errors="replace").split(":", 1)[-1].strip()
            print(value)
imap.logout()
