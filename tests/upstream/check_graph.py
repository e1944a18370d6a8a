#!/usr/bin/env python3
"""Proof that the test upstream's Microsoft Graph stand-in (graph.py) and the Postfix
SendAsDenied injection behave as README.md says (python3 stdlib only).

Run against a running upstream (upstream.json of $OXB_UPSTREAM_DIR, default
/tmp/oxbridge-upstream):

  python3 tests/upstream/check_graph.py [--only token,sendmail-1mb,...]

Checks (each prints one PASS/FAIL line; the exit status is 1 if any failed):

  token             client_credentials with scope https://graph.microsoft.com/.default gives a
                    Graph token (aud, roles Mail.Send + Mail.ReadWrite, no refresh token); a Graph
                    scope without /.default is refused; no scope still gives the Exchange token
  sendmail-1mb      a 1 MB MIME message (8-bit text, lines starting with dots) by sendMail:
                    202 with an empty body; fetched back from alice's INBOX over IMAPS (TLS
                    verified against UPSTREAM_CA) it is byte for byte the MIME that was sent,
                    after Dovecot's Return-Path, Delivered-To and Received fields
  sendmail-bcc      To alice, Bcc bob: both get it, byte for byte without the Bcc field
  sendmail-413      a ~5 MB MIME message: 413 RequestEntityTooLarge, and nothing is delivered
  upload-30mb       draft (base64 MIME, text/plain) + createUploadSession for a 30 MiB file +
                    4 MiB PUTs without Authorization (200 + nextExpectedRanges, then 201 +
                    Location) + send (202): from IMAP, the text part and headers are the draft's
                    and the attachment part (headers, 76-column base64) decodes to the same bytes
  draft-mixed       a multipart/mixed draft + a small JSON fileAttachment + a 3 MiB upload: both
                    are appended to the draft's own multipart/mixed, in order
  upload-errors     PUT with Authorization 401, overlapping range 416, out of order 416, chunk
                    over 4 MiB 413, wrong total 400, expired session 401, createUploadSession
                    under 3 MiB 400
  auth-401          Exchange (outlook) app token and delegated token: 401 Invalid audience; no
                    token: 401 Access token is empty; expired Graph token: 401 Lifetime validation
  auth-403          tenant nomailsend: 403 ErrorAccessDenied on sendMail and on send (drafts
                    work); tenant mailsendonly: 403 on creating a draft
  throttle-429      POST /admin/throttle: 429 with Retry-After: 2 and the TooManyRequests body;
                    the retry after Retry-After gets 202; GRAPH_LOG shows it came >= 2 s after
                    the 429; the 503 variant has Retry-After too
  smtp-554          alice to sendas-denied@example.test over submission (STARTTLS, XOAUTH2):
                    DATA refused with exactly the 554 5.2.252 SendAsDenied line; alice to bob
                    still 250 and delivered
  imap-graph-token  a Graph token does not open IMAP (the error challenge, then NO)

Messages it delivers are deleted again (UID EXPUNGE of those only); throttling is limited to
paths only this check uses.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import re
import smtplib
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from email import policy
from email.parser import BytesParser

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
SENDAS_DENIED = ("554 5.2.252 SendAsDenied; alice@example.test not allowed to send as alice@example.test; "
                 "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied")
MIB = 1024 * 1024
TRACE = (b"return-path", b"delivered-to", b"received")
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Fail(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Fail(msg)


def claims(token):
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


# ---------------------------------------------------------------- upstream + IDP
class Upstream:
    def __init__(self):
        state = os.environ.get("OXB_UPSTREAM_DIR", "/tmp/oxbridge-upstream").rstrip("/")
        with open(state + "/upstream.json") as f:
            self.env = env = json.load(f)
        need(env.get("GRAPH_URL"), "upstream.json has no GRAPH_URL: restart the upstream with this start")
        self.ctx = ssl.create_default_context(cafile=env["UPSTREAM_CA"])
        self.passwords = dict(s.split(":", 1) for s in env["UPSTREAM_USERS"].split())
        self.graph = env["GRAPH_URL"]
        u = urllib.parse.urlsplit(self.graph)
        self.graph_host, self.graph_port = u.hostname, u.port
        self.base = "%s://%s" % (u.scheme, u.netloc)
        self.imaps, self.submission = int(env["IMAPS_PORT"]), int(env["SUBMISSION_PORT"])
        self.log = env["GRAPH_LOG"]
        self._tokens = {}

    def idp(self, path, form, ok=True):
        data = urllib.parse.urlencode(form).encode()
        try:
            with HTTP.open(self.env["IDP_URL"] + path, data, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            if ok:
                raise Fail("IDP %s: HTTP %d %s" % (path, e.code, e.read()[:300]))
            return e.code, json.loads(e.read() or b"{}")

    def app_token(self, tenant="common", scope=GRAPH_SCOPE):
        key = (tenant, scope)
        if key not in self._tokens:
            form = {"grant_type": "client_credentials", "client_id": self.env["APP_CLIENT_ID"],
                    "client_secret": self.env["APP_CLIENT_SECRET"]}
            if scope:
                form["scope"] = scope
            self._tokens[key] = self.idp("/%s/oauth2/v2.0/token" % tenant, form)[1]["access_token"]
        return self._tokens[key]

    def user_token(self, user):
        key = ("user", user)
        if key not in self._tokens:
            self._tokens[key] = self.idp("/common/oauth2/v2.0/token", {
                "grant_type": "password", "client_id": self.env["PUBLIC_CLIENT_ID"], "username": user,
                "password": self.passwords[user]})[1]["access_token"]
        return self._tokens[key]

    def issue(self, body):
        req = urllib.request.Request(self.env["IDP_URL"] + "/admin/issue", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with HTTP.open(req, timeout=10) as r:
            return json.load(r)

    # ------------------------------------------------------------ HTTPS to graph.py
    def call(self, method, url, body=b"", headers=None, token=None):
        """(status, headers (lower-case names), body bytes) of one request on a new connection."""
        u = urllib.parse.urlsplit(url if "://" in url else self.graph + url)
        h = {"Content-Length": str(len(body))} if body or method in ("POST", "PUT") else {}
        if token:
            h["Authorization"] = "Bearer " + token
        h.update(headers or {})
        c = http.client.HTTPSConnection(u.hostname, u.port, context=self.ctx, timeout=60)
        try:
            c.putrequest(method, u.path + ("?" + u.query if u.query else ""), skip_accept_encoding=True)
            for k, v in h.items():
                c.putheader(k, v)
            c.endheaders()
            if body:
                c.send(body)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def admin(self, path, body=None):
        st, _, data = self.call("POST" if body is not None else "GET", self.base + path,
                                json.dumps(body).encode() if body is not None else b"",
                                {"Content-Type": "application/json"})
        need(st == 200, "%s: HTTP %d %s" % (path, st, data[:200]))
        return json.loads(data)

    def send_mime(self, user, mime, token=None, path=None):
        return self.call("POST", path or "/users/%s/sendMail" % user, base64.b64encode(mime),
                         {"Content-Type": "text/plain"}, token or self.app_token())

    def log_lines(self):
        out = []
        with open(self.log, errors="replace") as f:
            for ln in f:
                try:
                    out.append(json.loads(ln))
                except ValueError:
                    pass
        return out


def graph_error(status, body, want_status, want_code, want_message=None):
    need(status == want_status, "expected HTTP %d, got %d %s" % (want_status, status, body[:300]))
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise Fail("not a Graph error body: %r" % body[:300])
    need(err.get("code") == want_code, "error code %r, expected %r" % (err.get("code"), want_code))
    if want_message is not None:
        need(err.get("message") == want_message, "message %r, expected %r" % (err.get("message"), want_message))
    need(isinstance(err.get("innerError"), dict) and err["innerError"].get("request-id"),
         "no innerError.request-id in %r" % err)
    return err


# ---------------------------------------------------------------- IMAP
class Imap:
    def __init__(self, up, user, token=None):
        raw = socket.create_connection(("127.0.0.1", up.imaps), timeout=60)
        self.s = up.ctx.wrap_socket(raw, server_hostname="localhost")
        self.f = self.s.makefile("rb")
        self.n = 0
        greeting = self.f.readline()
        need(greeting.startswith(b"* OK"), "IMAP greeting %r" % greeting)
        self.user = user
        self.login_reply = self.login(token or up.user_token(user))

    def response(self):
        parts, lits = [], []
        while True:
            ln = self.f.readline()
            if not ln:
                raise Fail("IMAP connection closed")
            parts.append(ln)
            m = re.search(rb"\{(\d+)\}\r\n\Z", ln)
            if not m:
                return b"".join(parts), lits
            lits.append(self.f.read(int(m.group(1))))

    def cmd(self, line):
        self.n += 1
        tag = b"c%d" % self.n
        self.s.sendall(tag + b" " + line + b"\r\n")
        items = []
        while True:
            text, lits = self.response()
            if text.startswith(tag + b" "):
                return items, text
            if text.startswith(b"+"):
                return items, text
            items.append((text, lits))

    def login(self, token):
        sasl = base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (self.user, token)).encode())
        _, reply = self.cmd(b"AUTHENTICATE XOAUTH2 " + sasl)
        if reply.startswith(b"+"):  # the error challenge: answer empty, then the NO
            self.s.sendall(b"\r\n")
            while True:
                text, _ = self.response()
                if text.startswith(b"c%d " % self.n):
                    return (reply, text)
        return (None, reply)

    def ok(self, line):
        items, reply = self.cmd(line)
        need(b" OK" in reply[:12], "IMAP %r: %r" % (line[:60], reply[:200]))
        return items

    def take(self, marker, wait=10.0, count=1):
        """The messages of INBOX whose Subject contains marker (waiting up to `wait` s for
        `count` of them), deleted afterwards."""
        deadline = time.time() + wait
        while True:
            self.ok(b"SELECT INBOX")
            items = self.ok(b'UID SEARCH HEADER Subject "' + marker.encode() + b'"')
            uids = [u for t, _ in items if t.startswith(b"* SEARCH") for u in t.split()[2:]]
            if len(uids) >= count or time.time() > deadline:
                break
            time.sleep(0.2)
        msgs = []
        for uid in uids:
            items = self.ok(b"UID FETCH " + uid + b" BODY.PEEK[]")
            msgs += [lits[0] for t, lits in items if lits]
        if uids:
            s = b",".join(uids)
            self.ok(b"UID STORE " + s + b" +FLAGS.SILENT (\\Deleted)")
            self.ok(b"UID EXPUNGE " + s)
        return msgs

    def close(self):
        try:
            self.s.sendall(b"z LOGOUT\r\n")
            self.s.close()
        except OSError:
            pass


def take(up, user, marker, wait=10.0, count=1):
    c = Imap(up, user)
    try:
        _, reply = c.login_reply
        need(b" OK" in reply[:12], "IMAP login of %s: %r" % (user, reply))
        return c.take(marker, wait, count)
    finally:
        c.close()


def after_trace(msg):
    """The message without the trace fields Dovecot (and Postfix) put on top."""
    pos = 0
    while True:
        m = re.match(rb"([!-9;-~]+):[^\n]*\n(?:[ \t][^\n]*\n)*", msg[pos:])
        if not m or m.group(1).lower() not in TRACE:
            return msg[pos:], msg[:pos]
        pos += m.end()


def marker(name):
    return "oxb-graph-check %s %s" % (name, uuid.uuid4().hex[:12])


def text_mime(subject, body, to="alice@example.test", extra=""):
    return ("From: Alice <alice@example.test>\r\nTo: %s\r\n%sSubject: %s\r\nDate: %s\r\n"
            "Message-ID: <%s@example.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            % (to, extra, subject, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
               uuid.uuid4().hex)).encode() + body


def filler(size, seed):
    """size bytes of CRLF text lines (some starting with dots, one UTF-8 line)."""
    head = "Grüße aus der Testumgebung – ✓\r\n.\r\n..two dots\r\n.one dot\r\n".encode()
    text = base64.b64encode(random.Random(seed).randbytes(size)).replace(b"/", b" ")[:size]
    lines = b"\r\n".join(text[i:i + 74] for i in range(0, len(text), 74))
    return (head + lines)[:size - 2] + b"\r\n"


# ---------------------------------------------------------------- checks
def check_token(up):
    st, r = up.idp("/common/oauth2/v2.0/token", {
        "grant_type": "client_credentials", "client_id": up.env["APP_CLIENT_ID"],
        "client_secret": up.env["APP_CLIENT_SECRET"], "scope": GRAPH_SCOPE})
    c = claims(r["access_token"])
    need(r["scope"] == GRAPH_SCOPE, "scope %r" % r["scope"])
    need(c["aud"] == "https://graph.microsoft.com", "aud %r" % c["aud"])
    need(sorted(c.get("roles", [])) == ["Mail.ReadWrite", "Mail.Send"], "roles %r" % c.get("roles"))
    need("refresh_token" not in r, "client_credentials gave a refresh token")
    st, r = up.idp("/common/oauth2/v2.0/token", {
        "grant_type": "client_credentials", "client_id": up.env["APP_CLIENT_ID"],
        "client_secret": up.env["APP_CLIENT_SECRET"], "scope": "https://graph.microsoft.com/Mail.Send"}, ok=False)
    need(st == 400 and r.get("error") == "invalid_scope" and "AADSTS1002012" in r.get("error_description", ""),
         "Graph scope without /.default: %d %r" % (st, r))
    st, r = up.idp("/common/oauth2/v2.0/token", {
        "grant_type": "client_credentials", "client_id": up.env["APP_CLIENT_ID"],
        "client_secret": up.env["APP_CLIENT_SECRET"]})
    need(r["scope"] == "https://outlook.office365.com/.default" and claims(r["access_token"])["aud"] ==
         "https://outlook.office.com", "no scope: %r aud %r" % (r["scope"], claims(r["access_token"])["aud"]))
    roles = {}
    for tenant in ("nomailsend", "mailsendonly"):
        roles[tenant] = claims(up.app_token(tenant))["roles"]
    need(roles == {"nomailsend": ["Mail.ReadWrite"], "mailsendonly": ["Mail.Send"]}, "tenant roles %r" % roles)
    return ["Graph token: aud %s, roles %s, expires_in %d" % (c["aud"], ",".join(c["roles"]), r["expires_in"]),
            "Mail.Send scope refused (AADSTS1002012)", "no scope: Exchange token as before",
            "nomailsend/mailsendonly roles ok"]


def check_sendmail_1mb(up):
    m = marker("1mb")
    mime = text_mime(m, filler(1_000_000, 1))
    need(990_000 < len(mime) < 1_010_000, "MIME is %d bytes" % len(mime))
    t0 = time.time()
    st, h, body = up.send_mime("alice@example.test", mime)
    need(st == 202 and body == b"" and h.get("content-length") == "0",
         "sendMail: %d %r %r" % (st, h.get("content-length"), body[:200]))
    ms = (time.time() - t0) * 1000
    msgs = take(up, "alice@example.test", m)
    need(len(msgs) == 1, "%d messages with the marker in alice's INBOX" % len(msgs))
    rest, trace = after_trace(msgs[0])
    need(trace.startswith(b"Return-Path: <alice@example.test>\r\n"), "trace fields: %r" % trace[:200])
    need(rest == mime, "delivered message differs from the MIME sent (%d vs %d bytes; first difference at %s)"
         % (len(rest), len(mime), next((i for i, (a, b) in enumerate(zip(rest, mime)) if a != b), "end")))
    return ["%d-byte MIME: 202 in %.0f ms, empty body" % (len(mime), ms),
            "IMAP: identical after %d bytes of trace fields (%s)" % (
                len(trace), ", ".join(sorted({ln.split(b":")[0].decode() for ln in trace.split(b"\r\n")
                                              if ln and ln[:1] not in b" \t"})))]


def check_sendmail_bcc(up):
    m = marker("bcc")
    mime = text_mime(m, b"hello bob, you are in Bcc\r\n", extra="Cc: nobody@elsewhere.invalid\r\n"
                     "Bcc: Bob <bob@example.test>\r\n")
    st, _, body = up.send_mime("alice@example.test", mime)
    need(st == 202, "sendMail: %d %r" % (st, body[:200]))
    want = mime.replace(b"Bcc: Bob <bob@example.test>\r\n", b"")
    notes = []
    got = {user: take(up, user, m) for user in ("alice@example.test", "bob@example.test")}
    for user, msgs in got.items():
        need(len(msgs) == 1, "%d copies for %s" % (len(msgs), user))
        rest, _ = after_trace(msgs[0])
        need(rest == want, "%s's copy is not the MIME without Bcc: %r" % (user, rest[:300]))
        notes.append("%s: without Bcc" % user.split("@")[0])
    entry = [e for e in up.log_lines() if e.get("status") == 202 and e.get("path", "").endswith("/sendMail")][-1]
    need(entry.get("discarded") == ["nobody@elsewhere.invalid"], "log: discarded %r" % entry.get("discarded"))
    return notes + ["other domain discarded"]


def check_sendmail_413(up):
    m = marker("413")
    mime = text_mime(m, filler(5_000_000, 2))
    st, _, body = up.send_mime("alice@example.test", mime)
    err = graph_error(st, body, 413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")
    msgs = take(up, "alice@example.test", m, wait=1.0)
    need(not msgs, "the refused message was delivered")
    entry = [e for e in up.log_lines() if e.get("status") == 413][-1]
    need(entry.get("body_bytes") == len(base64.b64encode(mime)), "log body_bytes %r" % entry.get("body_bytes"))
    return ["%d-byte MIME (%d base64): 413 %s \"%s\"" % (len(mime), entry["body_bytes"], err["code"], err["message"]),
            "nothing delivered"]


def create_draft(up, mime, token=None, user="alice@example.test"):
    st, h, body = up.call("POST", "/users/%s/messages" % user, base64.b64encode(mime),
                          {"Content-Type": "text/plain"}, token or up.app_token())
    need(st == 201, "create draft: %d %r" % (st, body[:300]))
    d = json.loads(body)
    need(d.get("id") and d.get("isDraft") is True, "draft resource %r" % d)
    return d


def upload_session(up, draft_id, name, size, ctype="application/octet-stream", user="alice@example.test"):
    st, _, body = up.call("POST", "/users/%s/messages/%s/attachments/createUploadSession" % (
        user, urllib.parse.quote(draft_id, safe="")), json.dumps({"AttachmentItem": {
            "attachmentType": "file", "name": name, "size": size, "contentType": ctype}}).encode(),
        {"Content-Type": "application/json"}, up.app_token())
    need(st == 201, "createUploadSession: %d %r" % (st, body[:300]))
    s = json.loads(body)
    need(s.get("nextExpectedRanges") == ["0-"] and s.get("uploadUrl") and
         re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", s.get("expirationDateTime", "")),
         "upload session %r" % s)
    return s


def put_chunk(up, url, data, start, total, headers=None):
    h = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
         "Content-Range": "bytes %d-%d/%d" % (start, start + len(data) - 1, total)}
    h.update(headers or {})
    return up.call("PUT", url, data, h)


def upload(up, url, data, chunk=4 * MIB):
    for start in range(0, len(data), chunk):
        st, h, body = put_chunk(up, url, data[start:start + chunk], start, len(data))
        last = start + chunk >= len(data)
        if not last:
            need(st == 200, "PUT %d: %d %r" % (start, st, body[:300]))
            r = json.loads(body)
            need(r.get("nextExpectedRanges") == ["%d" % (start + chunk)], "PUT %d: %r" % (start, r))
        else:
            need(st == 201 and body == b"" and "/Attachments('" in h.get("location", ""),
                 "last PUT: %d location=%r %r" % (st, h.get("location"), body[:300]))
    return (len(data) + chunk - 1) // chunk


def send_draft(up, draft_id, token=None, user="alice@example.test"):
    return up.call("POST", "/users/%s/messages/%s/send" % (user, urllib.parse.quote(draft_id, safe="")),
                   b"", {"Content-Length": "0"}, token or up.app_token())


def attachment_parts(raw):
    return [p for p in BytesParser(policy=policy.default).parsebytes(raw).walk()
            if p.get_content_disposition() in ("attachment", "inline")]


def check_upload_30mb(up):
    m = marker("30mb")
    text = "The 30 MiB file is attached.\r\nGrüße, Alice\r\n".encode()
    mime = text_mime(m, text)
    data = random.Random(3).randbytes(30 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    t0 = time.time()
    d = create_draft(up, mime)
    s = upload_session(up, d["id"], "big.bin", len(data))
    puts = upload(up, s["uploadUrl"], data)
    st, _, body = send_draft(up, d["id"])
    need(st == 202 and body == b"", "send: %d %r" % (st, body[:300]))
    t_send = time.time() - t0
    msgs = take(up, "alice@example.test", m)
    need(len(msgs) == 1, "%d messages with the marker" % len(msgs))
    rest, _ = after_trace(msgs[0])
    msg = BytesParser(policy=policy.default).parsebytes(rest)
    for k in ("From", "To", "Subject", "Message-ID", "Date"):
        need(msg[k] is not None and re.search(rb"(?im)^" + k.encode() + rb":", mime), "header %s lost" % k)
    need(msg.get_content_type() == "multipart/mixed", "top-level %s" % msg.get_content_type())
    body_part = msg.get_body(("plain",))
    need(body_part is not None and body_part.get_content().replace("\r\n", "\n") ==
         text.decode().replace("\r\n", "\n"), "text part differs: %r" % (
             body_part.get_content()[:200] if body_part else None))
    atts = attachment_parts(rest)
    need(len(atts) == 1, "%d attachments" % len(atts))
    a = atts[0]
    need(a["Content-Type"] == 'application/octet-stream; name="big.bin"' and
         a["Content-Disposition"] == 'attachment; filename="big.bin"' and
         a["Content-Transfer-Encoding"] == "base64", "attachment headers %r" % list(a.items()))
    got = a.get_payload(decode=True)
    need(hashlib.sha256(got).hexdigest() == digest, "attachment bytes differ (%d vs %d)" % (len(got), len(data)))
    b64 = rest.split(b'Content-Transfer-Encoding: base64\r\n\r\n', 1)[1].split(b"\r\n--", 1)[0]
    widths = {len(ln) for ln in b64.split(b"\r\n")[:-1]}
    need(widths == {76} and b"\n" not in b64.replace(b"\r\n", b""), "base64 line widths %r" % widths)
    return ["draft + session + %d PUTs of <= 4 MiB + send in %.1f s" % (puts, t_send),
            "IMAP: %d bytes, text part and headers kept, big.bin %d bytes sha256 ok, 76-column base64"
            % (len(rest), len(got))]


def check_draft_mixed(up):
    m = marker("mixed")
    mime = ("From: alice@example.test\r\nTo: alice@example.test\r\nSubject: %s\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\nmixed body\r\n--b1\r\n"
            "Content-Type: text/csv; name=\"own.csv\"\r\nContent-Disposition: attachment; filename=\"own.csv\"\r\n\r\n"
            "a,b\r\n--b1--\r\nepilogue\r\n" % m).encode()
    d = create_draft(up, mime)
    small = b"small attachment\r\n" * 10
    st, _, body = up.call("POST", "/users/alice@example.test/messages/%s/attachments" % urllib.parse.quote(
        d["id"], safe=""), json.dumps({"@odata.type": "#microsoft.graph.fileAttachment", "name": "small.txt",
                                      "contentType": "text/plain", "contentBytes": base64.b64encode(small).decode()}
                                     ).encode(), {"Content-Type": "application/json"}, up.app_token())
    need(st == 201 and json.loads(body).get("size") == len(small), "POST attachments: %d %r" % (st, body[:200]))
    data = random.Random(4).randbytes(3 * MIB)
    s = upload_session(up, d["id"], "three.bin", len(data))
    upload(up, s["uploadUrl"], data)
    st, _, body = send_draft(up, d["id"])
    need(st == 202, "send: %d %r" % (st, body[:200]))
    msgs = take(up, "alice@example.test", m)
    need(len(msgs) == 1, "%d messages" % len(msgs))
    rest, _ = after_trace(msgs[0])
    head, tail = rest.split(b"\r\n--b1--\r\n", 1)
    need(tail == b"epilogue\r\n" and head.count(b"\r\n--b1\r\n") == 4, "structure: %d parts, tail %r"
         % (head.count(b"\r\n--b1\r\n"), tail[:50]))
    names = [(p.get_filename(), p.get_payload(decode=True)) for p in attachment_parts(rest)]
    need([n for n, _ in names] == ["own.csv", "small.txt", "three.bin"], "attachments %r" % [n for n, _ in names])
    need(names[1][1] == small and names[2][1] == data, "attachment bytes differ")
    return ["own part kept, small.txt (JSON) and three.bin (3 MiB upload) appended to boundary b1, epilogue kept"]


def check_upload_errors(up):
    notes = []
    d = create_draft(up, text_mime(marker("errors"), b"never sent\r\n"))
    size = 9 * MIB
    s = upload_session(up, d["id"], "e.bin", size)
    url = s["uploadUrl"]
    chunk = b"\0" * MIB
    st, _, body = put_chunk(up, url, chunk, 0, size, {"Authorization": "Bearer " + up.app_token()})
    graph_error(st, body, 401, "InvalidAuthenticationToken")
    notes.append("Authorization: 401")
    st, _, body = put_chunk(up, url, chunk, 0, size)
    need(st == 200, "first PUT %d %r" % (st, body[:200]))
    st, _, body = put_chunk(up, url, chunk, MIB // 2, size)
    graph_error(st, body, 416, "invalidRange", "Uploaded fragment overlaps with existing data.")
    st, _, body = put_chunk(up, url, chunk, 2 * MIB, size)
    graph_error(st, body, 416, "invalidRange", "Uploaded fragment is out of order.")
    notes.append("overlap, out of order: 416 invalidRange")
    st, _, body = put_chunk(up, url, b"\0" * (4 * MIB + 1), MIB, size)
    graph_error(st, body, 413, "RequestEntityTooLarge")
    notes.append("4 MiB + 1: 413")
    st, _, body = put_chunk(up, url, chunk, MIB, size + 1)
    graph_error(st, body, 400, "invalidRequest")
    notes.append("wrong total: 400")
    st, _, body = put_chunk(up, url + "x", chunk, MIB, size)
    graph_error(st, body, 401, "InvalidAuthenticationToken")
    st, _, body = put_chunk(up, url, chunk, MIB, size)
    need(st == 200 and json.loads(body)["nextExpectedRanges"] == ["%d" % (2 * MIB)],
         "after the refusals the session goes on: %d %r" % (st, body[:200]))
    need(up.admin("/admin/sessions/expire", {})["expired"] >= 1, "nothing expired")
    st, _, body = put_chunk(up, url, chunk, 2 * MIB, size)
    graph_error(st, body, 401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")
    notes.append("expired session: 401")
    st, _, body = up.call("POST", "/users/alice@example.test/messages/%s/attachments/createUploadSession"
                          % urllib.parse.quote(d["id"], safe=""), json.dumps({"AttachmentItem": {
                              "attachmentType": "file", "name": "small", "size": 3 * MIB - 1}}).encode(),
                          {"Content-Type": "application/json"}, up.app_token())
    graph_error(st, body, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
    notes.append("3 MiB - 1: 400")
    st, _, body = up.call("DELETE", "/users/alice@example.test/messages/%s" % urllib.parse.quote(d["id"], safe=""),
                          token=up.app_token())
    need(st == 204, "DELETE draft: %d %r" % (st, body[:200]))
    return notes


def check_auth_401(up):
    m = marker("401")
    mime = text_mime(m, b"x\r\n")
    notes = []
    for what, tok in (("Exchange app token", up.app_token(scope=None)),
                      ("delegated token", up.user_token("alice@example.test"))):
        st, h, body = up.send_mime("alice@example.test", mime, tok)
        graph_error(st, body, 401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.")
        need(h.get("www-authenticate", "").startswith("Bearer "), "no WWW-Authenticate")
        notes.append("%s: Invalid audience" % what)
    st, _, body = up.call("POST", "/users/alice@example.test/sendMail", base64.b64encode(mime),
                          {"Content-Type": "text/plain"})
    graph_error(st, body, 401, "InvalidAuthenticationToken", "Access token is empty.")
    notes.append("no token: empty")
    expired = up.issue({"app": True, "scope": GRAPH_SCOPE, "expires_in": 0})["access_token"]
    st, _, body = up.send_mime("alice@example.test", mime, expired)
    graph_error(st, body, 401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")
    notes.append("expired: Lifetime validation failed")
    need(not take(up, "alice@example.test", m, wait=0.5), "a refused message was delivered")
    return notes


def check_auth_403(up):
    m = marker("403")
    mime = text_mime(m, b"x\r\n")
    denied = "Access is denied. Check credentials and try again."
    tok = up.app_token("nomailsend")
    st, _, body = up.send_mime("alice@example.test", mime, tok)
    graph_error(st, body, 403, "ErrorAccessDenied", denied)
    d = create_draft(up, mime, tok)
    st, _, body = send_draft(up, d["id"], tok)
    graph_error(st, body, 403, "ErrorAccessDenied", denied)
    st, _, body = up.call("DELETE", "/users/alice@example.test/messages/%s" % urllib.parse.quote(d["id"], safe=""),
                          token=tok)
    need(st == 204, "DELETE draft: %d" % st)
    st, _, body = up.call("POST", "/users/alice@example.test/messages", base64.b64encode(mime),
                          {"Content-Type": "text/plain"}, up.app_token("mailsendonly"))
    graph_error(st, body, 403, "ErrorAccessDenied", denied)
    need(not take(up, "alice@example.test", m, wait=0.5), "a refused message was delivered")
    return ["nomailsend: sendMail 403, draft 201, send 403", "mailsendonly: draft 403"]


def check_throttle_429(up):
    m = marker("429")
    mime = text_mime(m, b"throttled once\r\n")
    # the user segment is case-insensitive: this spelling is seen by this check only
    path = "/v1.0/users/Alice@Example.test/sendMail"
    up.admin("/admin/throttle", {"count": 1, "status": 429, "retry_after": 2, "path": path})
    try:
        st, h, body = up.send_mime("alice@example.test", mime, path=up.base + path)
        err = graph_error(st, body, 429, "TooManyRequests", "Please retry again later.")
        need(h.get("retry-after") == "2", "Retry-After %r" % h.get("retry-after"))
        time.sleep(float(h["retry-after"]))
        st, _, body = up.send_mime("alice@example.test", mime, path=up.base + path)
        need(st == 202, "retry: %d %r" % (st, body[:200]))
        need(len(take(up, "alice@example.test", m)) == 1, "the retried message was not delivered once")
        entries = [e for e in up.log_lines() if e.get("path") == path][-2:]
        need([e["status"] for e in entries] == [429, 202], "log: %r" % entries)
        gap = entries[1]["time"] - entries[0]["end"]
        need(gap >= 2 and entries[0].get("retry_after") == 2 and entries[0].get("throttled"),
             "log: retry %.3f s after the 429" % gap)
        up.admin("/admin/throttle", {"count": 1, "status": 503, "retry_after": 1, "path": path})
        st, h, body = up.send_mime("alice@example.test", mime, path=up.base + path)
        graph_error(st, body, 503, "ServiceNotAvailable")
        need(h.get("retry-after") == "1", "503 Retry-After %r" % h.get("retry-after"))
    finally:
        up.admin("/admin/throttle", {"count": 0})
    return ["429 %s, Retry-After: 2, innerError %s" % (err["code"], err["innerError"].get("code")),
            "retry 202, %.2f s after the 429 in GRAPH_LOG" % gap, "503 with Retry-After: 1"]


def smtp_session(up, user):
    s = smtplib.SMTP("127.0.0.1", up.submission, timeout=60)
    s.starttls(context=up.ctx)
    s.ehlo()
    sasl = base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (user, up.user_token(user))).encode())
    code, text = s.docmd("AUTH", "XOAUTH2 " + sasl.decode())
    need(code == 235, "AUTH XOAUTH2: %d %r" % (code, text))
    return s


def check_smtp_554(up):
    m = marker("554")
    s = smtp_session(up, "alice@example.test")
    try:
        msg = text_mime(m, b"not allowed\r\n", to="sendas-denied@example.test")
        try:
            s.sendmail("alice@example.test", ["sendas-denied@example.test"], msg)
            raise Fail("the message to sendas-denied@example.test was accepted")
        except smtplib.SMTPDataError as e:
            got = "%d %s" % (e.smtp_code, e.smtp_error.decode())
        need(got == SENDAS_DENIED, "DATA reply %r" % got)
        ok = text_mime(m, b"allowed\r\n", to="bob@example.test")
        refused = s.sendmail("alice@example.test", ["bob@example.test"], ok)
        need(refused == {}, "to bob: %r" % refused)
    finally:
        s.quit()
    msgs = take(up, "bob@example.test", m)
    need(len(msgs) == 1 and after_trace(msgs[0])[0] == ok, "bob got %d messages (or a different one)" % len(msgs))
    return ["end of DATA: %s" % got[:60] + "...", "alice -> bob: 250, delivered unchanged"]


def check_imap_graph_token(up):
    c = Imap(up, "alice@example.test", up.app_token())
    try:
        challenge, reply = c.login_reply
        need(challenge is not None and challenge.startswith(b"+ eyJ"), "no error challenge: %r" % (challenge,))
        need(b" NO " in reply, "IMAP login with a Graph token: %r" % reply)
    finally:
        c.close()
    return ["error challenge, then %s" % reply.decode().strip()[:60]]


CHECKS = {
    "token": check_token,
    "sendmail-1mb": check_sendmail_1mb,
    "sendmail-bcc": check_sendmail_bcc,
    "sendmail-413": check_sendmail_413,
    "upload-30mb": check_upload_30mb,
    "draft-mixed": check_draft_mixed,
    "upload-errors": check_upload_errors,
    "auth-401": check_auth_401,
    "auth-403": check_auth_403,
    "throttle-429": check_throttle_429,
    "smtp-554": check_smtp_554,
    "imap-graph-token": check_imap_graph_token,
}


def main():
    ap = argparse.ArgumentParser(description="check the Graph stand-in and the SendAsDenied injection")
    ap.add_argument("--only", help="comma-separated check names: " + ",".join(CHECKS))
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CHECKS)
    bad = [n for n in names if n not in CHECKS]
    if bad:
        ap.error("unknown checks: %s" % ",".join(bad))
    up = Upstream()
    failed = 0
    t_all = time.time()
    for name in names:
        t0 = time.time()
        try:
            notes = CHECKS[name](up)
            print("PASS %-16s %5.1fs  %s" % (name, time.time() - t0, "; ".join(notes)), flush=True)
        except (Fail, OSError, ssl.SSLError, smtplib.SMTPException, http.client.HTTPException,
                KeyError, ValueError, IndexError) as e:
            failed += 1
            print("FAIL %-16s %5.1fs  %s" % (name, time.time() - t0, e), flush=True)
    print("%d of %d checks passed in %.1f s" % (len(names) - failed, len(names), time.time() - t_all))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
