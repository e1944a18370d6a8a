#!/usr/bin/env python3
"""A device that polls with NOOP for a long time: Python's imaplib logs in
with a password, selects MAILBOX and sends NOOP every INTERVAL seconds; when
the message count grows it fetches the new messages' Message-IDs. After
SECONDS it logs out and prints one JSON line: the Message-IDs seen and the
error that ended the session early, if any (a BYE ends it with one).

    imap_poll.py PORT USER PASSWORD MAILBOX SECONDS INTERVAL
"""
import imaplib
import json
import re
import sys
import time

port, user, password, mailbox, seconds, interval = sys.argv[1:7]
seen, error, noops = [], None, 0
try:
    imap = imaplib.IMAP4("127.0.0.1", int(port), timeout=60)
    imap.login(user, password)
    typ, data = imap.select('"%s"' % mailbox)
    known = int(data[0])
    end = time.time() + float(seconds)
    while time.time() < end:
        time.sleep(float(interval))
        typ, _ = imap.noop()
        noops += 1
        exists = imap.untagged_responses.pop("EXISTS", None)
        if exists:
            count = int(exists[-1])
            if count > known:
                typ, parts = imap.fetch(
                    "%d:%d" % (known + 1, count), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                for part in parts:
                    if isinstance(part, tuple):
                        m = re.search(rb"Message-ID:\s*(<[^>]+>)", part[1], re.I)
                        if m:
                            seen.append(m.group(1).decode())
                known = count
    imap.logout()
except Exception as e:  # imaplib.abort on BYE, socket errors
    error = "%s: %s" % (type(e).__name__, e)
print(json.dumps({"seen": seen, "error": error, "noops": noops}))
