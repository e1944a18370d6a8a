#!/usr/bin/env python3
"""Send a stream of messages with Python's smtplib, one session at a time,
like a device that keeps trying: when the server goes away (or answers 4xx),
reconnect and send the same message again until it gets a 250.

The port is read from --port-file before each connection, so the server may
come back elsewhere. Messages are <PREFIX-N@oxbridge.test>, N = 0..COUNT-1.
Prints one JSON object: {"acked": [ids...], "attempts": N, "errors": [...]}.
"""
import argparse
import json
import smtplib
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--port-file", required=True)
p.add_argument("--user", required=True)
p.add_argument("--password", required=True)
p.add_argument("--sender", required=True)
p.add_argument("--rcpt", required=True)
p.add_argument("--prefix", required=True)
p.add_argument("--count", type=int, required=True)
p.add_argument("--body-lines", type=int, default=200)
p.add_argument("--pause", type=float, default=0, help="seconds between messages")
p.add_argument("--deadline", type=float, default=240)
a = p.parse_args()

end = time.time() + a.deadline


def message(i):
    mid = "<%s-%d@oxbridge.test>" % (a.prefix, i)
    lines = ["From: %s" % a.sender, "To: %s" % a.rcpt, "Subject: stream %d" % i,
             "Message-ID: %s" % mid, "Date: Thu, 03 Dec 2026 12:00:00 +0000", ""]
    lines += ["line %d of message %d: %s" % (k, i, "x" * 60) for k in range(a.body_lines)]
    return mid, ("\r\n".join(lines) + "\r\n").encode()


acked, errors, attempts = [], [], 0
conn = None
for i in range(a.count):
    mid, data = message(i)
    while True:
        if time.time() > end:
            print(json.dumps({"acked": acked, "attempts": attempts, "errors": errors[-20:],
                              "gave_up_at": i}))
            sys.exit(1)
        attempts += 1
        try:
            if conn is None:
                port = int(open(a.port_file).read().strip())
                conn = smtplib.SMTP("127.0.0.1", port, timeout=20)
                conn.ehlo("stream.test")
                conn.login(a.user, a.password)
            conn.sendmail(a.sender, [a.rcpt], data)
            acked.append(mid)
            time.sleep(a.pause)
            break
        except (smtplib.SMTPException, OSError, ValueError) as e:
            errors.append("%s: %s" % (mid, str(e)[:120]))
            try:
                if conn is not None:
                    conn.close()
            except Exception:
                pass
            conn = None
            time.sleep(0.05)
try:
    conn.quit()
except Exception:
    pass
print(json.dumps({"acked": acked, "attempts": attempts, "errors": errors[-20:]}))
