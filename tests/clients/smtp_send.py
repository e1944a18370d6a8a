#!/usr/bin/env python3
"""Send one message with Python's smtplib, as a device would.

Prints one JSON object: {"ok": true} or {"ok": false, "code": N, "error": "..."}.
Exit status 0 when the message was accepted, 1 otherwise.
"""
import argparse
import json
import smtplib
import ssl
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--starttls", action="store_true")
p.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (SMTPS)")
p.add_argument("--cafile")
p.add_argument("--tls-name", default="localhost")
p.add_argument("--user")
p.add_argument("--password")
p.add_argument("--mech", choices=["PLAIN", "LOGIN", "NONE"], default="NONE",
               help="NONE: no AUTH (a device relayed by its network)")
p.add_argument("--source", help="local address to connect from")
p.add_argument("--no-initial-response", action="store_true")
p.add_argument("--sender", required=True)
p.add_argument("--rcpt", required=True)
p.add_argument("--message", required=True, help="file with the message, CRLF line endings")
p.add_argument("--timeout", type=float, default=120)
p.add_argument("--hold", type=float, default=0, help="seconds to keep the session open after sending")
a = p.parse_args()


def result(ok, code=None, error=None):
    print(json.dumps({"ok": ok, "code": code, "error": error}))
    sys.exit(0 if ok else 1)


try:
    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.implicit_tls:
        s = smtplib.SMTP_SSL(host=a.tls_name, port=a.port, timeout=a.timeout, context=ctx)
    else:
        s = smtplib.SMTP(timeout=a.timeout, source_address=(a.source, 0) if a.source else None)
        s.connect(a.host, a.port)
    s._host = a.tls_name  # the name STARTTLS verifies
    s.ehlo("device.test")
    if a.starttls:
        s.starttls(context=ctx)
        s.ehlo("device.test")
    if a.mech != "NONE":
        s.user, s.password = a.user, a.password
        auth = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login}[a.mech]
        s.auth(a.mech, auth, initial_response_ok=not a.no_initial_response)
    data = open(a.message, "rb").read()
    if s.has_extn("8bitmime"):
        opts = ["BODY=8BITMIME"]
    s.sendmail(a.sender, [a.rcpt], data, mail_options=opts)
    time.sleep(a.hold)
    s.quit()
except smtplib.SMTPResponseException as e:
    result(False, e.smtp_code, e.smtp_error.decode("utf-8", "replace"))
except smtplib.SMTPRecipientsRefused as e:
    code, msg = list(e.recipients.values())[0]
    result(False, code, msg.decode("utf-8", "replace"))
except (smtplib.SMTPException, OSError) as e:
    result(False, None, "%s: %s" % (type(e).__name__, e))
result(True)
