#!/usr/bin/python3
"""imaplib2 (the IMAP library of offlineimap3, Debian's python3-imaplib2)
through STARTTLS, many times in a row.

  imaplib2_starttls.py PORT SESSIONS

Each session: connect, STARTTLS, CAPABILITY, LOGOUT. imaplib2 reads the
connection in one thread and writes it in another; a command lost after
the handshake is a session whose CAPABILITY gets no answer within
LIMIT_S. Prints one JSON line: {"sessions": n, "ok": n, "failures": [...]}.
"""
import json
import sys
import threading

import imaplib2

LIMIT_S = 3


def session(port, result):
    try:
        imap = imaplib2.IMAP4("localhost", port, timeout=LIMIT_S)
        imap.starttls()
        typ, _ = imap.capability()
        result.append(typ)
        imap.logout()
    except Exception as e:  # the failure is the finding
        result.append("%s: %s" % (type(e).__name__, str(e)[:120]))


def main():
    port, sessions = int(sys.argv[1]), int(sys.argv[2])
    ok, failures = 0, []
    for i in range(sessions):
        result = []
        t = threading.Thread(target=session, args=(port, result), daemon=True)
        t.start()
        t.join(LIMIT_S + 2)
        outcome = result[0] if result else "hung"
        if outcome == "OK":
            ok += 1
        else:
            failures.append("session %d: %s" % (i, outcome))
    print(json.dumps({"sessions": sessions, "ok": ok, "failures": failures}))


if __name__ == "__main__":
    main()
