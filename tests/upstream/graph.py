#!/usr/bin/env python3
"""Microsoft Graph stand-in for oxbridge's end-to-end tests (python3 stdlib only).

HTTPS on 127.0.0.1 (the test upstream's server certificate). It implements the part of
Graph v1.0 that sends mail for a mailbox with an application token, and delivers what it
sends to the real Dovecot over LMTP:

  POST /v1.0/users/{upn}/sendMail                      text/plain (base64 MIME) | application/json
  POST /v1.0/users/{upn}/messages                      draft: text/plain (base64 MIME) | application/json
  DELETE /v1.0/users/{upn}/messages/{id}               drop a draft
  POST /v1.0/users/{upn}/messages/{id}/attachments     small fileAttachment (JSON, contentBytes)
  POST /v1.0/users/{upn}/messages/{id}/attachments/createUploadSession
  PUT|DELETE {uploadUrl}                               /api/v2.0/Users('..')/Messages('..')/AttachmentSessions('..')?authtoken=..
  POST /v1.0/users/{upn}/messages/{id}/send

Tokens are checked with the IDP (POST /introspect?for=graph): only app tokens issued for
https://graph.microsoft.com/.default are accepted; Mail.Send is needed to send, Mail.ReadWrite
to create drafts and attachments.

Admin (plain JSON, no auth, loopback only): GET /health, GET|POST /admin/throttle,
GET|POST /admin/config, GET /admin/stats, POST /admin/stats/reset, GET /admin/drafts,
POST /admin/sessions/expire. See README.md.

One JSON object per line goes to stderr (start sends it to $S/log/graph.log): one per
request, plus "event" lines. Tokens are never logged (paths are logged without the query).

With --milter SOCKET it also serves a Postfix milter that refuses, at the end of DATA, any
message to sendas-denied@<domain> with Exchange's 554 5.2.252 SendAsDenied.

  graph.py --port 29443 --cert server.crt --key server.key --idp http://127.0.0.1:28080 \\
      --users "alice@example.test bob@example.test" --lmtp $S/dovecot/run/lmtp \\
      --milter $S/run/milter.sock --pidfile graph.pid
"""

import argparse
import base64
import binascii
import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import json
import os
import re
import secrets
import signal
import smtplib
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024
REQUEST_LIMIT = 4 * MIB      # Graph's 4 MB request limit, applied to the request body
CHUNK_LIMIT = 4 * MIB        # one PUT to an upload session ("up to 4 MB each time")
DRAIN_LIMIT = 160 * MIB      # a refused body up to this size is read and dropped (keep-alive);
                             # a larger one is not read: answer, then close the connection
ATTACH_MAX = 150 * MIB       # upload sessions: 3 MB to 150 MB; also all attachments of a draft
STORE_BUDGET = 1024 * MIB    # bytes of drafts + uploads kept in memory at most
MAX_DRAFTS = 500
DRAFT_IDLE = 3600            # drafts (and their sessions) untouched this long are dropped
SOCKET_TIMEOUT = 30          # per socket operation, TLS handshake included
IDP_TIMEOUT = 10
LMTP_TIMEOUT = 120
RETRY_EVERY = 2              # seconds between tries of a recipient LMTP could not take
RETRY_FOR = 600              # then it is given up (logged as rejected)
GRAPH_RESOURCE = "https://graph.microsoft.com"
SEND_ASDENIED_LOCAL = "sendas-denied"

CONFIG = {  # runtime knobs, POST /admin/config
    "upload_session_ttl": 7200,      # seconds an uploadUrl stays valid (expirationDateTime)
    "upload_min_size": 3 * MIB,      # smallest AttachmentItem.size createUploadSession accepts
    "lmtp_defer": 0,                 # the next N LMTP deliveries fail as if Dovecot were down
}
THROTTLE = {"count": 0, "status": 429, "retry_after": 1, "code": None, "message": None, "path": None}
THROTTLE_DEFAULT_BODY = {429: ("TooManyRequests", "Please retry again later."),
                         503: ("ServiceNotAvailable", "The service is temporarily unavailable. "
                                                      "Please retry again later.")}

LOCK = threading.Lock()
LOG_LOCK = threading.Lock()
DRAFTS = {}       # message id -> {"user", "mime", "created", "touched", "attachments": [..]}
SESSIONS = {}     # session id -> {"user", "draft", "item", "token", "exp", "next", "chunks", "lock"}
STATS = {}
QUEUE = []        # recipients LMTP could not take yet: {"sender", "msg", "rcpts", "opts", "since"}
ARGS = None
USERS = {}        # lower-case address -> address as configured
DOMAIN = ""
BASE_URL = ""     # https://127.0.0.1:PORT
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def reset_stats():
    STATS.clear()
    STATS.update(requests=0, by_status={}, sent=0, delivered=0, discarded=0, rejected=0,
                 deferred=0, throttled=0, drafts_created=0, sessions_created=0, uploads_completed=0,
                 milter_rejects=0)


def log(obj):
    line = json.dumps(obj, separators=(",", ":"), sort_keys=False)
    with LOG_LOCK:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def event(name, **fields):
    log(dict({"time": round(time.time(), 6), "event": name}, **fields))


def iso(t, digits=0):
    """2019-09-25T01:09:30Z, or with digits=7 2019-09-25T01:09:30.7671707Z like Graph."""
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    s = d.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        s += (".%07d" % int((t % 1) * 1e7))[:digits + 1]
    return s + "Z"


def new_id(prefix="AAMkAD"):
    """An Exchange-looking item id (URL-safe base64, as Graph's are)."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(30)).decode().rstrip("=") + "="


class GraphError(Exception):
    """A Graph-style error answer: {"error": {"code", "message", "innerError"}}."""

    def __init__(self, status, code, message, inner=None, headers=()):
        super().__init__(message)
        self.status, self.code, self.message, self.inner, self.headers = \
            status, code, message, inner, list(headers)


def bad_request(message, code="BadRequest"):
    return GraphError(400, code, message)


def not_found_item():
    return GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


def token_error(message):
    return GraphError(401, "InvalidAuthenticationToken", message, headers=[(
        "WWW-Authenticate", 'Bearer realm="", authorization_uri='
        '"https://login.microsoftonline.com/common/oauth2/authorize", '
        'client_id="00000003-0000-0000-c000-000000000000"')])


# ---------------------------------------------------------------- MIME helpers
def split_head(raw):
    """(header block, separator, body) of a message; the separator is the blank line."""
    m = re.search(rb"\r?\n\r?\n", raw)
    if not m:
        return raw, b"", b""
    return raw[:m.start()], raw[m.start():m.end()], raw[m.end():]


def header_fields(head):
    """[(name lower-case, raw field bytes incl. continuation lines and line ends)]; the last
    field has no line end when the header block has none (see split_head)."""
    out = []
    for line in re.split(rb"(?<=\n)", head):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line)
        else:
            name = line.split(b":", 1)[0].strip().lower() if b":" in line else b""
            out.append((name.decode("latin-1"), line))
    return out


def looks_like_mime(raw):
    head, _, _ = split_head(raw)
    first = head.split(b"\n", 1)[0]
    return bool(raw.strip()) and re.match(rb"^[!-9;-~]+:", first) is not None


def strip_bcc(raw):
    """The message without its Bcc: field(s); every other byte unchanged."""
    head, sep, body = split_head(raw)
    fields = header_fields(head)
    if not any(n == "bcc" for n, _ in fields):
        return raw
    kept = b"".join(f for n, f in fields if n != "bcc")
    if not head.endswith(b"\n") and kept.endswith(b"\n"):
        kept = kept[:-2] if kept.endswith(b"\r\n") else kept[:-1]
    return kept + sep + body


def mime_recipients(raw):
    """To, Cc and Bcc addresses of a MIME message, in order, without duplicates."""
    head, _, _ = split_head(raw)
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\r\n\r\n")
    values = []
    for name in ("To", "Cc", "Bcc"):
        values += [str(v) for v in msg.get_all(name, [])]
    seen, out = set(), []
    for _, addr in email.utils.getaddresses(values):
        addr = addr.strip()
        if "@" in addr and addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(addr)
    return out


def decode_mime_body(body):
    """The base64 request body of a MIME request (line breaks allowed), decoded."""
    try:
        raw = base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if not raw:
        raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
    if not looks_like_mime(raw):
        raise GraphError(400, "ErrorMimeContentInvalid", "MIME content does not contain all required "
                         "information, malformed formatting, or empty.")
    return raw


def b64_lines(data):
    """base64 in 76-column lines joined by CRLF (no CRLF after the last one)."""
    return base64.encodebytes(data).rstrip(b"\n").replace(b"\n", b"\r\n")


def param_value(name, value):
    """name="value" for a printable-ASCII value, else RFC 2231 name*=utf-8''..."""
    if re.fullmatch(r'[ !#-\[\]-~]*', value):
        return '%s="%s"' % (name, value)
    return "%s*=utf-8''%s" % (name, urllib.parse.quote(value, safe=""))


def clean_header_value(v, default):
    v = re.sub(r"[\r\n\x00]", " ", str(v or "")).strip()
    return v or default


def attachment_part(att):
    name = att["name"]
    ctype = clean_header_value(att.get("contentType"), "application/octet-stream")
    lines = ["Content-Type: %s; %s" % (ctype, param_value("name", name)),
             "Content-Disposition: %s; %s" % ("inline" if att.get("isInline") else "attachment",
                                               param_value("filename", name))]
    if att.get("contentId"):
        lines.append("Content-ID: <%s>" % clean_header_value(att["contentId"], "").strip("<>"))
    lines.append("Content-Transfer-Encoding: base64")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b64_lines(att["data"])


def top_content_type(head):
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\r\n\r\n")
    return (msg.get_content_type(), msg.get_param("boundary"))


def render_with_attachments(raw, atts, draft_id):
    """The draft's MIME with each attachment appended as a part of the top-level
    multipart/mixed; a draft that is not multipart/mixed is wrapped into one first."""
    if not atts:
        return raw
    head, sep, body = split_head(raw)
    ctype, boundary = top_content_type(head)
    parts = [attachment_part(a) for a in atts]
    if ctype == "multipart/mixed" and boundary:
        b = boundary.encode("latin-1", "replace")
        close = re.compile(rb"(\r?\n)--" + re.escape(b) + rb"--[ \t]*(?=\r?\n|\Z)")
        found = list(close.finditer(body))
        if found:
            at = found[-1].start()
            nl = found[-1].group(1)
            insert = b"".join(nl + b"--" + b + nl + p.replace(b"\r\n", nl) for p in parts)
            return head + sep + body[:at] + insert + body[at:]
    # wrap: the Content-* fields go to the first part, the rest stay on top
    boundary = "=_oxbridge-graph_" + hashlib.sha256(draft_id.encode()).hexdigest()[:24]
    fields = header_fields(head)
    inner = b"".join(f for n, f in fields if n.startswith("content-"))
    outer = b"".join(f for n, f in fields if not n.startswith("content-"))
    if outer and not outer.endswith(b"\n"):
        outer += b"\r\n"
    if inner and not inner.endswith(b"\n"):
        inner += b"\r\n"
    if not any(n == "mime-version" for n, _ in fields):
        outer += b"MIME-Version: 1.0\r\n"
    b = boundary.encode()
    outer += b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n'
    out = outer + b"\r\n--" + b + b"\r\n" + inner + b"\r\n" + body
    for p in parts:
        out += b"\r\n--" + b + b"\r\n" + p
    return out + b"\r\n--" + b + b"--\r\n"


def text_of(raw):
    """(contentType, content) of the message's text body, for the JSON message resource."""
    try:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
        part = msg.get_body(("plain", "html"))
        if part is None:
            return "text", ""
        return ("html" if part.get_content_subtype() == "html" else "text"), part.get_content()
    except Exception:  # the resource is informational only
        return "text", ""


def recipients_json(values):
    return [{"emailAddress": {"name": n or a, "address": a}}
            for n, a in email.utils.getaddresses([str(v) for v in values]) if "@" in a]


def message_resource(user, draft):
    raw = draft["mime"]
    head, _, _ = split_head(raw)
    h = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n\r\n")
    ctype, content = text_of(raw)
    created = iso(draft["created"])
    frm = recipients_json(h.get_all("From", [])) or [{"emailAddress": {"name": user, "address": user}}]
    return {
        "@odata.context": "%s/v1.0/$metadata#users('%s')/messages/$entity" % (
            BASE_URL, urllib.parse.quote(user, safe="@")),
        "@odata.etag": 'W/"%s"' % draft["change_key"],
        "id": draft["id"], "createdDateTime": created, "lastModifiedDateTime": iso(draft["touched"]),
        "changeKey": draft["change_key"], "categories": [], "receivedDateTime": created,
        "sentDateTime": created, "hasAttachments": bool(draft["attachments"]),
        "internetMessageId": str(h.get("Message-ID") or "<%s@%s>" % (draft["id"][6:30], DOMAIN)),
        "subject": str(h.get("Subject") or ""), "bodyPreview": content[:255],
        "importance": "normal", "parentFolderId": "AQMkADrafts", "conversationId": "AAQk" + draft["id"][6:40],
        "isDeliveryReceiptRequested": False, "isReadReceiptRequested": False, "isRead": True,
        "isDraft": True, "webLink": "https://outlook.office365.com/owa/?ItemID=%s" % urllib.parse.quote(
            draft["id"], safe=""), "inferenceClassification": "focused",
        "body": {"contentType": ctype, "content": content},
        "sender": frm[0], "from": frm[0],
        "toRecipients": recipients_json(h.get_all("To", [])),
        "ccRecipients": recipients_json(h.get_all("Cc", [])),
        "bccRecipients": recipients_json(h.get_all("Bcc", [])),
        "replyTo": recipients_json(h.get_all("Reply-To", [])),
        "flag": {"flagStatus": "notFlagged"},
    }


def address_of(obj, what):
    try:
        addr = obj["emailAddress"]["address"]
        name = obj["emailAddress"].get("name") or ""
    except (TypeError, KeyError, AttributeError):
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid: %s "
                         "has no emailAddress.address." % what)
    if not isinstance(addr, str) or "@" not in addr:
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid.")
    return email.utils.formataddr((name, addr)) if name else addr


def mime_from_json(user, msg):
    """A JSON message resource rendered as MIME with Python's email package (CRLF)."""
    if not isinstance(msg, dict) or not msg:
        raise GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.")
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = address_of(msg["from"], "from") if msg.get("from") else user
    for key, header in (("toRecipients", "To"), ("ccRecipients", "Cc"), ("bccRecipients", "Bcc"),
                        ("replyTo", "Reply-To")):
        values = msg.get(key) or []
        if not isinstance(values, list):
            raise bad_request("'%s' must be a collection." % key, "ErrorInvalidParameter")
        if values:
            m[header] = ", ".join(address_of(v, key) for v in values)
    m["Subject"] = clean_header_value(msg.get("subject"), "")
    m["Date"] = email.utils.formatdate(usegmt=True)
    m["Message-ID"] = email.utils.make_msgid(domain=DOMAIN)
    for h in msg.get("internetMessageHeaders") or []:
        name = str((h or {}).get("name") or "")
        if not re.fullmatch(r"[Xx]-[!-9;-~]+", name):
            raise bad_request("Only custom headers starting with 'x-' or 'X-' may be set: '%s'." % name,
                              "InvalidInternetMessageHeader")
        m[name] = clean_header_value(h.get("value"), "")
    body = msg.get("body") or {}
    subtype = "html" if str(body.get("contentType", "text")).lower() == "html" else "plain"
    m.set_content(str(body.get("content") or ""), subtype=subtype, charset="utf-8")
    for a in msg.get("attachments") or []:
        att = file_attachment(a)
        maintype, _, subtype = att["contentType"].partition("/")
        m.add_attachment(att["data"], maintype=maintype or "application",
                         subtype=subtype or "octet-stream", filename=att["name"])
    return m.as_bytes()


def file_attachment(a):
    if not isinstance(a, dict) or str(a.get("@odata.type", "")).lower() != "#microsoft.graph.fileattachment":
        raise bad_request("Only #microsoft.graph.fileAttachment is supported by this stand-in.",
                          "ErrorInvalidParameter")
    name = a.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_request("The attachment name is missing.", "ErrorInvalidParameter")
    try:
        data = base64.b64decode(str(a.get("contentBytes") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("contentBytes is not valid base64.", "ErrorInvalidParameter")
    ctype = clean_header_value(a.get("contentType"), "application/octet-stream")
    return {"id": new_id("AAMkADatt"), "name": name, "contentType": ctype, "size": len(data),
            "data": data, "isInline": bool(a.get("isInline")), "contentId": a.get("contentId")}


# ---------------------------------------------------------------- delivery over LMTP
def lmtp_send(sender, msg, rcpts, opts, retry=False):
    """One LMTP connection, one transaction per recipient: (delivered, rejected, deferred,
    error). A 4xx reply or a failed connection defers a recipient; a 5xx rejects it.
    lmtp_defer applies to first attempts only."""
    delivered, rejected, deferred, error = [], [], [], None
    with LOCK:
        down = not retry and CONFIG["lmtp_defer"] > 0
        CONFIG["lmtp_defer"] -= down
    try:
        if down:
            raise ConnectionRefusedError(111, "Connection refused (lmtp_defer)")
        with smtplib.LMTP(ARGS.lmtp, local_hostname="localhost", timeout=LMTP_TIMEOUT) as lm:
            for r in rcpts:
                try:
                    lm.sendmail(sender, [r], msg, mail_options=opts)
                    delivered.append(r)
                except smtplib.SMTPRecipientsRefused as e:
                    code, text = list(e.recipients.values())[0]
                    (deferred if 400 <= code < 500 else rejected).append(
                        "%s: %d %s" % (r, code, text.decode("utf-8", "replace")))
                except smtplib.SMTPResponseException as e:
                    (deferred if 400 <= e.smtp_code < 500 else rejected).append("%s: %d %s" % (
                        r, e.smtp_code, e.smtp_error.decode("utf-8", "replace")))
    except (OSError, smtplib.SMTPException) as e:
        error = "LMTP: %r" % e
        done = set(delivered) | {x.split(":", 1)[0] for x in rejected + deferred}
        deferred += ["%s: not delivered yet" % r for r in rcpts if r not in done]
    return delivered, rejected, deferred, error


def deliver(sender, raw, rcpts):
    """Deliver to each example.test recipient through Dovecot's LMTP socket, one transaction
    per recipient; other domains are discarded (as Postfix does here). A recipient Dovecot
    cannot take now (LMTP down, a 4xx) is queued and tried again, as Exchange's transport
    does after its 202, every RETRY_EVERY seconds for RETRY_FOR seconds."""
    msg = strip_bcc(raw)
    res = {"delivered": [], "discarded": [], "rejected": []}
    local = []
    for r in rcpts:
        (local if r.lower().endswith("@" + DOMAIN) else res["discarded"]).append(r)
    if local:
        opts = ["BODY=8BITMIME"] if re.search(rb"[\x80-\xff]", msg) else []
        delivered, rejected, deferred, error = lmtp_send(sender, msg, local, opts)
        res["delivered"] += delivered
        res["rejected"] += rejected
        if deferred:
            res["deferred"] = deferred
            later = [x.split(":", 1)[0] for x in deferred]
            with LOCK:
                QUEUE.append({"sender": sender, "msg": msg, "rcpts": later, "opts": opts,
                              "since": time.time()})
        if error:
            res["delivery_error"] = error
    with LOCK:
        STATS["sent"] += 1
        for k in ("delivered", "discarded", "rejected"):
            STATS[k] += len(res[k])
        STATS["deferred"] += len(res.get("deferred", []))
    return res


def retry_queue():
    """Forever: try the queued recipients again; give up on one after RETRY_FOR seconds."""
    while True:
        time.sleep(RETRY_EVERY)
        with LOCK:
            due, QUEUE[:] = list(QUEUE), []
        for item in due:
            try:
                delivered, rejected, deferred, error = lmtp_send(
                    item["sender"], item["msg"], item["rcpts"], item["opts"], retry=True)
            except Exception as e:  # never lose the queue to an unforeseen error
                delivered, rejected, error = [], [], "LMTP: %r" % e
                deferred = ["%s: not delivered yet" % r for r in item["rcpts"]]
            left = [x.split(":", 1)[0] for x in deferred]
            expired = left and time.time() - item["since"] > RETRY_FOR
            with LOCK:
                STATS["delivered"] += len(delivered)
                STATS["rejected"] += len(rejected) + (len(left) if expired else 0)
                if left and not expired:
                    QUEUE.append(dict(item, rcpts=left))
            if delivered or rejected or expired:
                event("delivery retried", sender=item["sender"], delivered=delivered,
                      rejected=rejected + (["%s: given up" % r for r in left] if expired else []),
                      error=error)


# ---------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "oxbridge-test-graph/1.0"
    timeout = SOCKET_TIMEOUT

    def setup(self):
        self.request.settimeout(SOCKET_TIMEOUT)
        self.request = self.server.tls.wrap_socket(self.request, server_side=True)  # handshake here
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            try:
                self.request.close()
            except OSError:
                pass

    def log_message(self, fmt, *args):  # our own JSON log instead
        pass

    def log_error(self, fmt, *args):  # http.server's own errors (bad request line, 431, ...)
        event("http_error", detail=(fmt % args)[:300])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = lambda self: self.dispatch()

    # ---------------------------------------------------------------- plumbing
    def dispatch(self):
        self.t0 = time.time()
        self.status, self.sent_bytes, self.body_bytes, self.extra = 0, 0, 0, {}
        self.request_id = str(uuid.uuid4())
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        self.url_path = url.path
        path = urllib.parse.unquote(url.path)
        try:
            self.route(self.command, path)
        except GraphError as e:
            self.error(e)
        except (ConnectionError, socket.timeout, ssl.SSLError) as e:
            self.close_connection = True
            self.extra["client_error"] = repr(e)[:200]
        except Exception as e:  # keep serving
            self.extra["exception"] = repr(e)[:300]
            if not self.status:
                self.error(GraphError(500, "generalException", "An unspecified error has occurred."))
        finally:
            with LOCK:
                STATS["requests"] += 1
                key = str(self.status)
                STATS["by_status"][key] = STATS["by_status"].get(key, 0) + 1
            t1 = time.time()
            log(dict({"time": round(self.t0, 6), "end": round(t1, 6), "method": self.command,
                      "path": self.url_path, "status": self.status, "body_bytes": self.body_bytes,
                      "response_bytes": self.sent_bytes, "ms": round((t1 - self.t0) * 1000, 1)},
                     **self.extra))

    def read_body(self, limit, length_required=True):
        """The request body, or None if it is over limit bytes (it is then read and dropped up
        to DRAIN_LIMIT, so that the connection stays usable). Content-Length or chunked; 411
        for a POST or PUT with neither."""
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if te:
            if te != "chunked":
                self.close_connection = True
                raise GraphError(501, "notSupported", "Transfer-Encoding '%s' is not supported." % te[:50])
            return self.read_chunked(limit)
        cl = self.headers.get("Content-Length")
        if cl is None:
            if length_required and self.command in ("POST", "PUT", "PATCH"):
                raise GraphError(411, "LengthRequired", "A Content-Length header is required on the request.")
            return b""
        if not cl.strip().isdigit():
            self.close_connection = True
            raise bad_request("Invalid Content-Length header.")
        n = int(cl)
        if n > limit:
            self.drain(n)
            return None
        data = self.rfile.read(n) if n else b""
        self.body_bytes = len(data)
        if len(data) < n:
            self.close_connection = True
            raise ConnectionError("client sent %d of %d body bytes" % (len(data), n))
        return data

    def read_chunked(self, limit):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise bad_request("Malformed chunked request body.")
            if size == 0:
                for _ in range(100):  # trailer fields, then the empty line
                    if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                        break
                break
            total += size
            self.body_bytes = total
            if total > DRAIN_LIMIT:
                self.close_connection = True
                self.extra["body_unread"] = True
                return None
            left = size
            while left > 0:
                got = self.rfile.read(min(left, 65536))
                if not got:
                    self.close_connection = True
                    raise ConnectionError("client closed within a chunk")
                if total <= limit:
                    parts.append(got)
                left -= len(got)
            self.rfile.readline(1024)  # the CRLF after the chunk
        return b"".join(parts) if total <= limit else None

    def drain(self, n):
        self.body_bytes = n
        if n > DRAIN_LIMIT:
            self.close_connection = True
            self.extra["body_unread"] = True
            return
        left = n
        while left > 0:
            got = self.rfile.read(min(left, 65536))
            if not got:
                self.close_connection = True
                return
            left -= len(got)

    def send(self, status, body=b"", ctype=None, headers=()):
        self.send_response(status)
        self.send_header("request-id", self.request_id)
        self.send_header("client-request-id", (self.headers.get("client-request-id") or
                                                self.request_id)[:100])
        self.send_header("Cache-Control", "no-cache")
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.status, self.sent_bytes = status, len(body)

    def json(self, status, obj, headers=()):
        ctype = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
        self.send(status, json.dumps(obj).encode(), ctype, headers)

    def error(self, e):
        inner = {"date": iso(time.time()), "request-id": self.request_id,
                 "client-request-id": (self.headers.get("client-request-id") or self.request_id)[:100]}
        if e.inner:
            inner = dict(e.inner, **inner)
        self.extra["error"] = e.code
        self.send(e.status, json.dumps({"error": {"code": e.code, "message": e.message,
                                                  "innerError": inner}}).encode(),
                  "application/json", e.headers)

    def plain(self, status, obj):  # admin answers
        self.send(status, json.dumps(obj).encode(), "application/json")

    # ---------------------------------------------------------------- routing
    def route(self, method, path):
        if path == "/health" or path.startswith("/admin/"):
            body = self.read_body(64 * 1024, length_required=False)
            if body is None:
                return self.plain(413, {"error": "body too large"})
            return self.admin(method, path, body)
        m = re.fullmatch(r"/api/v2\.0/Users\('([^'/]*)'\)/Messages\('([^'/]*)'\)/AttachmentSessions\('([^'/]*)'\)",
                         path, re.I)
        if m:
            return self.upload(method, m.group(1), m.group(2), m.group(3))
        if not (path == "/v1.0" or path.startswith("/v1.0/")):
            self.read_body(DRAIN_LIMIT, length_required=False)
            return self.plain(404, {"error": "not found"})
        body = self.read_body(REQUEST_LIMIT)
        if body is None:
            raise GraphError(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")
        app = self.authenticate()
        segs = [s for s in path.split("/")[2:] if s != ""]
        low = [s.lower() for s in segs]
        if low[:1] == ["me"]:
            raise bad_request("/me request is only valid with delegated authentication flow.")
        if len(segs) < 3 or low[0] != "users":
            raise bad_request("Resource not found for the segment '%s'." % (segs[0] if segs else "v1.0"))
        user = self.mailbox(segs[1])
        rest = low[2:]
        self.extra["user"] = user
        if rest == ["sendmail"]:
            return self.need(method, "POST") or self.send_mail(app, user, body)
        if rest == ["messages"]:
            return self.need(method, "POST") or self.create_draft(app, user, body)
        if len(rest) >= 2 and rest[0] == "messages":
            mid = segs[3]
            self.extra["draft"] = mid[:60]
            tail = rest[2:]
            if tail == []:
                return self.need(method, "DELETE") or self.delete_draft(app, user, mid)
            if tail == ["send"]:
                return self.need(method, "POST") or self.send_draft(app, user, mid)
            if tail == ["attachments"]:
                return self.need(method, "POST") or self.add_attachment(app, user, mid, body)
            if tail == ["attachments", "createuploadsession"]:
                return self.need(method, "POST") or self.create_session(app, user, mid, body)
        raise bad_request("Resource not found for the segment '%s'." % segs[-1])

    def need(self, method, want):
        if method != want:
            raise GraphError(405, "BadRequest", "Specified HTTP method is not allowed for the request target.")
        return None

    def authenticate(self):
        """The token's introspection record; Graph-like 401s otherwise. Then the throttle."""
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            raise token_error("Access token is empty.")
        try:
            req = urllib.request.Request(ARGS.idp + "/introspect?for=graph",
                                         urllib.parse.urlencode({"token": token}).encode())
            with HTTP.open(req, timeout=IDP_TIMEOUT) as r:
                info = json.load(r)
        except (OSError, ValueError) as e:
            self.extra["idp_error"] = repr(e)[:200]
            raise GraphError(503, "ServiceNotAvailable", "The token could not be validated (the test "
                             "IDP did not answer). Please retry again later.", headers=[("Retry-After", "1")])
        if not info.get("active"):
            if info.get("reason") == "expired":
                raise token_error("Lifetime validation failed, the token is expired.")
            raise token_error("Access token validation failure.")
        if info.get("aud") != GRAPH_RESOURCE:
            raise token_error("Access token validation failure. Invalid audience.")
        if not info.get("app"):
            raise token_error("Access token validation failure. This stand-in accepts only application "
                              "(client_credentials) tokens.")
        self.throttle()
        return info

    def throttle(self):
        with LOCK:
            t = THROTTLE
            hit = t["count"] > 0 and (not t["path"] or t["path"] in self.url_path)
            if hit:
                t["count"] -= 1
                STATS["throttled"] += 1
                status, retry = int(t["status"]), t["retry_after"]
                code, message = THROTTLE_DEFAULT_BODY.get(status, THROTTLE_DEFAULT_BODY[429])
                code, message = t["code"] or code, t["message"] or message
        if hit:
            ra = str(int(retry)) if float(retry).is_integer() else str(retry)
            self.extra.update(throttled=True, retry_after=float(retry))
            inner = {"code": str(status), "message": "Please retry after", "status": str(status)}
            raise GraphError(status, code, message, inner=inner, headers=[("Retry-After", ra)])

    def require(self, app, role):
        if role not in (app.get("roles") or []):
            self.extra["missing_role"] = role
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    def mailbox(self, seg):
        user = USERS.get(seg.lower())
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", "The requested user '%s' is invalid." % seg[:200])
        return user

    def mime_or_json(self, user, body):
        """(MIME bytes, JSON request or None) by Content-Type: text/plain or application/json."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "text/plain":
            return decode_mime_body(body), None
        if ctype == "application/json":
            try:
                obj = json.loads(body or b"null")
            except ValueError:
                raise bad_request("Unable to read JSON request payload. Please ensure Content-Type header is "
                                  "set and payload is of valid JSON format.")
            if not isinstance(obj, dict):
                raise bad_request("The request payload must be a JSON object.")
            return None, obj
        raise GraphError(415, "UnsupportedMediaType", "Content-Type must be text/plain (base64 MIME) or "
                         "application/json; got '%s'." % ctype[:100])

    # ---------------------------------------------------------------- endpoints
    def send_mail(self, app, user, body):
        self.require(app, "Mail.Send")
        raw, obj = self.mime_or_json(user, body)
        if obj is not None:
            raw = mime_from_json(user, obj.get("message"))
        rcpts = mime_recipients(raw)
        if not rcpts:
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid. The "
                             "message has no To, Cc or Bcc recipients.")
        self.extra.update(deliver(user, raw, rcpts))
        self.send(202)

    def create_draft(self, app, user, body):
        self.require(app, "Mail.ReadWrite")
        raw, obj = self.mime_or_json(user, body)
        if obj is not None:
            raw = mime_from_json(user, obj)
        now = time.time()
        d = {"id": new_id(), "user": user, "mime": raw, "created": now, "touched": now,
             "attachments": [], "change_key": secrets.token_urlsafe(18)}
        with LOCK:
            self.expire_drafts(now)
            if len(DRAFTS) >= MAX_DRAFTS or stored_bytes() + len(raw) > STORE_BUDGET:
                raise GraphError(507, "ErrorQuotaExceeded", "The test stand-in holds too many drafts; "
                                 "send or delete some.")
            DRAFTS[d["id"]] = d
            STATS["drafts_created"] += 1
        self.extra["draft"] = d["id"][:60]
        try:
            resource = message_resource(user, d)
        except Exception as e:  # informational only; the draft itself is stored
            self.extra["resource_error"] = repr(e)[:200]
            resource = {"id": d["id"], "isDraft": True, "hasAttachments": False}
        self.json(201, resource)

    @staticmethod
    def expire_drafts(now):
        for k in [k for k, v in DRAFTS.items() if now - v["touched"] > DRAFT_IDLE]:
            del DRAFTS[k]
        for k in [k for k, v in SESSIONS.items() if v["draft"] not in DRAFTS]:
            del SESSIONS[k]

    def draft(self, user, mid):
        d = DRAFTS.get(mid)
        if d is None or d["user"] != user:
            raise not_found_item()
        return d

    def delete_draft(self, app, user, mid):
        self.require(app, "Mail.ReadWrite")
        with LOCK:
            self.draft(user, mid)
            del DRAFTS[mid]
            for k in [k for k, v in SESSIONS.items() if v["draft"] == mid]:
                del SESSIONS[k]
        self.send(204)

    def send_draft(self, app, user, mid):
        self.require(app, "Mail.Send")
        with LOCK:
            d = self.draft(user, mid)
            rcpts = mime_recipients(d["mime"])
            if not rcpts:
                raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid. "
                                 "The message has no To, Cc or Bcc recipients.")
            del DRAFTS[mid]
            for k in [k for k, v in SESSIONS.items() if v["draft"] == mid]:
                del SESSIONS[k]
        raw = render_with_attachments(d["mime"], d["attachments"], mid)
        self.extra["attachments"] = len(d["attachments"])
        self.extra.update(deliver(user, raw, rcpts))
        self.send(202)

    def add_attachment(self, app, user, mid, body):
        self.require(app, "Mail.ReadWrite")
        try:
            obj = json.loads(body or b"null")
        except ValueError:
            raise bad_request("Unable to read JSON request payload.")
        att = file_attachment(obj)
        with LOCK:
            d = self.draft(user, mid)
            if sum(a["size"] for a in d["attachments"]) + att["size"] > ATTACH_MAX:
                raise GraphError(413, "ErrorMessageSizeExceeded", "The message exceeds the maximum "
                                 "supported size.")
            d["attachments"].append(att)
            d["touched"] = time.time()
        self.json(201, {
            "@odata.context": "%s/v1.0/$metadata#users('%s')/messages('%s')/attachments/$entity" % (
                BASE_URL, urllib.parse.quote(user, safe="@"), urllib.parse.quote(mid, safe="")),
            "@odata.type": "#microsoft.graph.fileAttachment", "@odata.mediaContentType": att["contentType"],
            "id": att["id"], "lastModifiedDateTime": iso(time.time()), "name": att["name"],
            "contentType": att["contentType"], "size": att["size"], "isInline": att["isInline"],
            "contentId": att["contentId"], "contentLocation": None,
            "contentBytes": base64.b64encode(att["data"]).decode()})

    def create_session(self, app, user, mid, body):
        self.require(app, "Mail.ReadWrite")
        try:
            obj = json.loads(body or b"null")
        except ValueError:
            raise bad_request("Unable to read JSON request payload.")
        item = None
        if isinstance(obj, dict):
            item = next((v for k, v in obj.items() if k.lower() == "attachmentitem"), None)
        if not isinstance(item, dict):
            raise bad_request("The request body must contain the parameter 'AttachmentItem'.",
                              "ErrorInvalidParameter")
        item = {k.lower(): v for k, v in item.items()}
        if str(item.get("attachmenttype", "")).lower() != "file":
            raise bad_request("AttachmentItem.attachmentType must be 'file'.", "ErrorInvalidParameter")
        name, size = item.get("name"), item.get("size")
        if not isinstance(name, str) or not name.strip():
            raise bad_request("AttachmentItem.name is missing.", "ErrorInvalidParameter")
        if isinstance(size, bool) or not isinstance(size, int):
            raise bad_request("AttachmentItem.size must be the file's size in bytes.", "ErrorInvalidParameter")
        if size < CONFIG["upload_min_size"]:
            raise bad_request("The attachment size %d is less than the minimum size %d for an upload "
                              "session; POST it to the attachments collection instead." % (
                                  size, CONFIG["upload_min_size"]),
                              "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
        now = time.time()
        sid = new_id("AAMkADses")
        with LOCK:
            d = self.draft(user, mid)
            pending = sum(s["item"]["size"] for s in SESSIONS.values() if s["draft"] == mid)
            if size > ATTACH_MAX or sum(a["size"] for a in d["attachments"]) + pending + size > ATTACH_MAX:
                raise bad_request("The attachment size %d exceeds the maximum size %d of a message's "
                                  "attachments." % (size, ATTACH_MAX),
                                  "ErrorAttachmentSizeShouldNotBeGreaterThanMaximumSize")
            if stored_bytes() + pending + size > STORE_BUDGET:
                raise GraphError(507, "ErrorQuotaExceeded", "The test stand-in holds too many uploads.")
            d["touched"] = now
            SESSIONS[sid] = {"user": user, "draft": mid, "token": secrets.token_urlsafe(32),
                             "exp": now + float(CONFIG["upload_session_ttl"]), "next": 0, "chunks": [],
                             "lock": threading.Lock(),
                             "item": {"name": name, "size": size,
                                      "contentType": item.get("contenttype") or "application/octet-stream",
                                      "isInline": bool(item.get("isinline")),
                                      "contentId": item.get("contentid")}}
            STATS["sessions_created"] += 1
            s = SESSIONS[sid]
        self.extra["session"] = sid[:60]
        self.json(201, {"@odata.context": "%s/v1.0/$metadata#microsoft.graph.uploadSession" % BASE_URL,
                        "uploadUrl": session_url(s, sid) + "?authtoken=" + s["token"],
                        "expirationDateTime": iso(s["exp"], 7), "nextExpectedRanges": ["0-"]})

    def upload(self, method, user, mid, sid):
        """PUT a byte range to an upload session, or DELETE (cancel) it."""
        self.extra["session"] = sid[:60]
        if method not in ("PUT", "DELETE"):
            self.read_body(DRAIN_LIMIT, length_required=False)
            raise GraphError(405, "BadRequest", "Specified HTTP method is not allowed for the request target.")
        body = self.read_body(CHUNK_LIMIT)
        if body is None:
            raise GraphError(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.",
                             inner={"code": "maxFragmentLengthExceeded"})
        if self.headers.get("Authorization"):
            raise token_error("Do not send an Authorization header with the pre-authenticated uploadUrl.")
        token = (self.query.get("authtoken") or [""])[-1]
        with LOCK:
            s = SESSIONS.get(sid)
            if s is not None and (s["user"].lower() != user.lower() or s["draft"] != mid):
                s = None
        if s is None:
            raise not_found_item()
        if not secrets.compare_digest(token.encode(), s["token"].encode()):
            raise token_error("Access token validation failure.")
        if time.time() >= s["exp"]:
            raise token_error("Lifetime validation failed, the token is expired.")
        self.throttle()
        if method == "DELETE":
            with LOCK:
                SESSIONS.pop(sid, None)
            return self.send(204)
        size = s["item"]["size"]
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", self.headers.get("Content-Range") or "")
        if not m:
            raise bad_request("The Content-Range header is missing or malformed; expected "
                              "'bytes {start}-{end}/{total}'.", "invalidRequest")
        a, b, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
        self.extra["range"] = "%d-%d/%d" % (a, b, total)
        if total != size:
            raise GraphError(400, "invalidRequest", "Declared total size for this fragment is different "
                             "from that of the upload session.", inner={"code": "fragmentLengthMismatch"})
        if a > b or b >= size:
            raise GraphError(416, "invalidRange", "The specified byte range is invalid or unavailable.")
        if len(body) != b - a + 1:
            raise bad_request("Content-Length %d does not match the Content-Range %d-%d." % (len(body), a, b),
                              "invalidRequest")
        with s["lock"]:
            with LOCK:
                if SESSIONS.get(sid) is not s:
                    raise not_found_item()
            if a < s["next"]:
                raise GraphError(416, "invalidRange", "Uploaded fragment overlaps with existing data.",
                                 inner={"code": "fragmentOverlap"})
            if a > s["next"]:
                raise GraphError(416, "invalidRange", "Uploaded fragment is out of order.",
                                 inner={"code": "fragmentOutOfOrder"})
            s["chunks"].append(body)
            s["next"] = b + 1
            done = s["next"] == size
        if not done:
            return self.json(200, {
                "@odata.context": "%s/api/v2.0/$metadata#Users('%s')/Messages('%s')/AttachmentSessions/$entity"
                                  % (BASE_URL, urllib.parse.quote(user, safe=""), urllib.parse.quote(mid, safe="")),
                "ExpirationDateTime": iso(s["exp"], 7), "nextExpectedRanges": ["%d" % s["next"]]})
        att = dict(s["item"], id=new_id("AAMkADatt"), data=b"".join(s["chunks"]))
        with LOCK:
            SESSIONS.pop(sid, None)
            d = DRAFTS.get(mid)
            if d is None:
                raise not_found_item()
            d["attachments"].append(att)
            d["touched"] = time.time()
            STATS["uploads_completed"] += 1
        self.extra["attachment"] = att["id"][:60]
        loc = "%s/api/v2.0/Users('%s')/Messages('%s')/Attachments('%s')" % (
            BASE_URL, s["user"], mid, att["id"])
        self.send(201, headers=[("Location", loc)])

    # ---------------------------------------------------------------- admin hooks
    def admin(self, method, path, body):
        try:
            prm = json.loads(body) if body.strip() else {}
        except ValueError:
            return self.plain(400, {"error": "body must be JSON"})
        if not isinstance(prm, dict):
            return self.plain(400, {"error": "body must be a JSON object"})
        if path == "/health":
            return self.plain(200, {"ok": True})
        if path == "/admin/throttle":
            if method == "POST":
                bad = [k for k in prm if k not in ("count", "status", "retry_after", "code", "message", "path")]
                if bad:
                    return self.plain(400, {"error": "unknown keys", "keys": bad})
                try:
                    new = dict(THROTTLE, code=None, message=None, path=None)
                    new.update(prm)
                    new["count"], new["status"] = int(new["count"]), int(new["status"])
                    new["retry_after"] = float(new["retry_after"])
                except (TypeError, ValueError):
                    return self.plain(400, {"error": "count, status and retry_after must be numbers"})
                if new["status"] not in (429, 503) or new["count"] < 0 or new["retry_after"] < 0:
                    return self.plain(400, {"error": "status must be 429 or 503; count, retry_after >= 0"})
                with LOCK:
                    THROTTLE.update(new)
                self.extra["throttle"] = {k: v for k, v in new.items() if v is not None}
            with LOCK:
                return self.plain(200, dict(THROTTLE))
        if path == "/admin/config":
            if method == "POST":
                bad = [k for k in prm if k not in CONFIG]
                if bad:
                    return self.plain(400, {"error": "unknown keys", "keys": bad, "allowed": sorted(CONFIG)})
                with LOCK:
                    for k, v in prm.items():
                        CONFIG[k] = type(CONFIG[k])(v)
            return self.plain(200, CONFIG)
        if path == "/admin/stats" and method == "GET":
            with LOCK:
                out = json.loads(json.dumps(STATS))
                out.update(drafts=len(DRAFTS), sessions=len(SESSIONS), stored_bytes=stored_bytes(),
                           queued=sum(len(q["rcpts"]) for q in QUEUE))
            return self.plain(200, out)
        if path == "/admin/stats/reset" and method == "POST":
            with LOCK:
                reset_stats()
            return self.plain(200, {"reset": True})
        if path == "/admin/drafts" and method == "GET":
            with LOCK:
                out = [{"id": k, "user": v["user"], "bytes": len(v["mime"]),
                        "attachments": [{"name": a["name"], "size": a["size"]} for a in v["attachments"]],
                        "sessions": [{"name": s["item"]["name"], "size": s["item"]["size"], "next": s["next"],
                                      "expires_in": round(s["exp"] - time.time(), 1)}
                                     for s in SESSIONS.values() if s["draft"] == k]}
                       for k, v in DRAFTS.items()]
            return self.plain(200, out)
        if path == "/admin/sessions/expire" and method == "POST":
            with LOCK:
                now = time.time()
                for s in SESSIONS.values():
                    s["exp"] = min(s["exp"], now)
                n = len(SESSIONS)
            return self.plain(200, {"expired": n})
        return self.plain(404, {"error": "not found"})


def session_url(s, sid):
    return "%s/api/v2.0/Users('%s')/Messages('%s')/AttachmentSessions('%s')" % (
        BASE_URL, s["user"], s["draft"], sid)


def stored_bytes():
    """Bytes held by drafts and uploads (call with LOCK held)."""
    n = sum(len(d["mime"]) + sum(a["size"] for a in d["attachments"]) for d in DRAFTS.values())
    return n + sum(s["next"] for s in SESSIONS.values())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):  # TLS handshake failures, resets: one line
        exc = sys.exc_info()[1]
        event("connection_error", error=repr(exc)[:300])


# ---------------------------------------------------------------- Postfix milter (SendAsDenied)
SMFIP = {"NOCONNECT": 0x1, "NOHELO": 0x2, "NOMAIL": 0x4, "NORCPT": 0x8, "NOBODY": 0x10, "NOHDRS": 0x20,
         "NOEOH": 0x40, "NR_HDR": 0x80, "NOUNKNOWN": 0x100, "NODATA": 0x200, "NR_CONN": 0x1000,
         "NR_HELO": 0x2000, "NR_MAIL": 0x4000, "NR_RCPT": 0x8000, "NR_DATA": 0x10000,
         "NR_UNKN": 0x20000, "NR_EOH": 0x40000, "NR_BODY": 0x80000}
MILTER_WANT = sum(SMFIP[k] for k in ("NOCONNECT", "NOHELO", "NOBODY", "NOHDRS", "NOEOH", "NOUNKNOWN",
                                     "NODATA", "NR_MAIL", "NR_RCPT"))
# command -> the protocol flag that says "no reply expected" (None: never a reply)
MILTER_NOREPLY = {b"C": "NR_CONN", b"H": "NR_HELO", b"M": "NR_MAIL", b"R": "NR_RCPT", b"T": "NR_DATA",
                  b"L": "NR_HDR", b"N": "NR_EOH", b"B": "NR_BODY", b"U": "NR_UNKN"}


class MilterHandler(socketserver.StreamRequestHandler):
    """Sendmail milter protocol (v2-v6), just enough to refuse at end of DATA a message with the
    recipient sendas-denied@<domain>, like Exchange refuses a submission it may not send as:

      554 5.2.252 SendAsDenied; <login> not allowed to send as <sender>; STOREDRV.Submission.
      Exception:SendAsDeniedException.MapiExceptionSendAsDenied   (one line)

    Everything else gets "continue". It asks Postfix for nothing but MAIL and RCPT (no replies)
    and the end of the message, so it never sees headers or bodies."""
    timeout = 3600

    def handle(self):
        flags, macros, sender, rcpts = 0, {}, "", []
        while True:
            head = self.rfile.read(4)
            if len(head) < 4:
                return
            (n,) = struct.unpack("!I", head)
            if n < 1 or n > 1024 * 1024:
                return
            pkt = self.rfile.read(n)
            if len(pkt) < n:
                return
            cmd, data = pkt[:1], pkt[1:]
            args = [a.decode("utf-8", "replace") for a in data.split(b"\0")]
            if cmd == b"O":
                ver, _, offered = struct.unpack("!III", data[:12])
                flags = MILTER_WANT & offered
                self.reply(b"O", struct.pack("!III", min(ver, 6), 0, flags))
            elif cmd == b"D":
                it = iter(data[1:].split(b"\0"))
                for k, v in zip(it, it):
                    macros[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
            elif cmd in (b"A", b"K"):
                sender, rcpts = "", []
            elif cmd == b"Q":
                return
            elif cmd == b"E":
                denied = [r for r in rcpts if r.lower() == "%s@%s" % (SEND_ASDENIED_LOCAL, DOMAIN)]
                if denied:
                    login = macros.get("{auth_authen}") or sender
                    text = ("554 5.2.252 SendAsDenied; %s not allowed to send as %s; STOREDRV.Submission."
                            "Exception:SendAsDeniedException.MapiExceptionSendAsDenied" % (login, sender or login))
                    text = re.sub(r"[%\r\n\x00]", "", text)
                    self.reply(b"y", text.encode() + b"\0")
                    with LOCK:
                        STATS["milter_rejects"] += 1
                    event("milter", action="reject", sender=sender, login=login, rcpts=rcpts[:20],
                          reply=text)
                else:
                    self.reply(b"c")
                sender, rcpts = "", []
            else:
                if cmd == b"M":
                    sender, rcpts = args[0].strip().strip("<>") if args else "", []
                elif cmd == b"R" and args:
                    rcpts.append(args[0].strip().strip("<>"))
                nr = MILTER_NOREPLY.get(cmd)
                if nr is None or not flags & SMFIP[nr]:
                    self.reply(b"c")

    def reply(self, cmd, data=b""):
        self.wfile.write(struct.pack("!I", len(data) + 1) + cmd + data)
        self.wfile.flush()


class MilterServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        event("milter_error", error=repr(sys.exc_info()[1])[:300])


# ---------------------------------------------------------------- main
def main():
    global ARGS, DOMAIN, BASE_URL
    ap = argparse.ArgumentParser(description="Microsoft Graph stand-in for the test upstream")
    ap.add_argument("--port", type=int, default=29443)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--idp", required=True, help="the test IDP, e.g. http://127.0.0.1:28080")
    ap.add_argument("--users", required=True, help="mailbox addresses, space-separated")
    ap.add_argument("--lmtp", required=True, help="Dovecot's LMTP socket")
    ap.add_argument("--milter", help="also serve the SendAsDenied milter on this unix socket")
    ap.add_argument("--pidfile")
    ARGS = ap.parse_args()
    ARGS.idp = ARGS.idp.rstrip("/")
    for u in ARGS.users.split():
        USERS[u.lower()] = u
    DOMAIN = sorted(USERS)[0].split("@", 1)[1]
    BASE_URL = "https://127.0.0.1:%d" % ARGS.port
    reset_stats()

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(ARGS.cert, ARGS.key)
    srv = Server(("127.0.0.1", ARGS.port), Handler)
    srv.tls = tls
    milter = None
    if ARGS.milter:
        try:
            os.unlink(ARGS.milter)
        except FileNotFoundError:
            pass
        milter = MilterServer(ARGS.milter, MilterHandler)
        os.chmod(ARGS.milter, 0o666)  # Postfix's smtpd runs as user postfix
        threading.Thread(target=milter.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    threading.Thread(target=retry_queue, daemon=True).start()
    if ARGS.pidfile:
        with open(ARGS.pidfile + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(ARGS.pidfile + ".tmp", ARGS.pidfile)

    def stop(*_):
        threading.Thread(target=srv.shutdown).start()
        if milter:
            threading.Thread(target=milter.shutdown).start()
    signal.signal(signal.SIGTERM, stop)
    event("listening", url=BASE_URL + "/v1.0", pid=os.getpid(), milter=ARGS.milter)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        if ARGS.pidfile and os.path.exists(ARGS.pidfile):
            with open(ARGS.pidfile) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(ARGS.pidfile)
        if ARGS.milter:
            try:
                os.unlink(ARGS.milter)
            except OSError:
                pass
        event("stopped")


if __name__ == "__main__":
    main()
