#!/usr/bin/env python3
"""Tiny Entra-ID-like OAuth2 server for oxbridge's end-to-end tests (stdlib only).

  POST .../token        grant_type password | client_credentials | refresh_token |
                        urn:ietf:params:oauth:grant-type:device_code
  POST .../devicecode   RFC 8628 device authorization (auto-approves, see config)
  POST /introspect      RFC 7662, called by Dovecot's oauth2 passdbs
                        (?for=dovecot-user or ?for=dovecot-app)
  GET  /health
  GET  /admin/stats     POST /admin/stats/reset
  GET|POST /admin/config                 runtime knobs (JSON object, see CONFIG)
  POST /admin/revoke    {"user": ..} | {"token": ..} | {"all": true}
  POST /admin/issue     {"user": .., "expires_in": n} | {"app": true}

Tokens live in memory only. Binds to 127.0.0.1.
"""

import argparse
import base64
import json
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus, urlsplit

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_SCOPE = ("https://outlook.office.com/IMAP.AccessAsUser.All "
              "https://outlook.office.com/POP.AccessAsUser.All "
              "https://outlook.office.com/SMTP.Send offline_access")
APP_SCOPE = "https://outlook.office365.com/.default"
CLIENTS = {"test-client": None, "test-app": "test-app-secret"}  # client_id -> secret

CONFIG = {  # runtime knobs, changed with POST /admin/config
    "access_ttl": 3600,
    "access_token_min_len": 0,
    "token_delay_ms": 0,
    "token_fail_count": 0,
    "token_fail_status": 503,
    "token_fail_error": "temporarily_unavailable",
    "introspect_fail_count": 0,
    "device_interval": 1,
    "device_auto_approve_after": 1,
    "log_secrets": False,
}
AADSTS = {  # error -> (code, description), like Entra's
    "invalid_grant": (50126, "Error validating credentials due to invalid username or password."),
    "invalid_client": (7000215, "Invalid client secret provided."),
    "unauthorized_client": (700016, "Application with identifier '%s' was not found in the directory."),
    "invalid_request": (900144, "The request body must contain the following parameter: '%s'."),
    "unsupported_grant_type": (70003, "The app requested an unsupported grant type '%s'."),
    "authorization_pending": (70016, "OAuth 2.0 device flow error. Authorization is pending. Continue polling."),
    "expired_token": (70019, "Verification code expired."),
    "temporarily_unavailable": (90033, "A transient error has occurred. Please try again."),
}

USERS = {}        # lower-case email -> password
LOCK = threading.Lock()
ACCESS = {}       # access token -> {"user": str|None, "app": bool, "exp": float}
REFRESH = {}      # refresh token -> {"user": str, "client_id": str}  (deleted when used)
DEVICES = {}      # device_code -> {"user": str, "client_id": str, "polls": int, "exp": float}
STATS = {}


def reset_stats():
    STATS.clear()
    STATS.update(token_requests=0, grant_requests={}, token_inflight=0,
                 token_inflight_max=0, introspect_requests=0)


def log(msg):
    sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class OAuthError(Exception):
    def __init__(self, error, arg="", status=400, description=None):
        super().__init__(error)
        code, text = AADSTS.get(error, (50000, "%s"))
        self.error, self.status, self.code = error, status, code
        self.description = "AADSTS%d: %s" % (code, description or (text % arg if "%s" in text else text))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(user, client_id, ttl=None, refresh=True):
    """A JWT-looking opaque access token (+ refresh token for delegated grants)."""
    ttl = CONFIG["access_ttl"] if ttl is None else int(ttl)
    now = int(time.time())
    claims = {"aud": "https://outlook.office.com", "appid": client_id, "iat": now,
              "exp": now + ttl, "jti": uuid.uuid4().hex}
    if user:
        claims.update(upn=user, scp="IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send")
    else:
        claims["roles"] = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
    head = b64url(b'{"typ":"JWT","alg":"RS256"}')
    token = "%s.%s.%s" % (head, b64url(json.dumps(claims).encode()), secrets.token_urlsafe(32))
    pad = CONFIG["access_token_min_len"] - len(token)
    if pad > 0:  # Exchange's tokens are 1.5-3 KB; keep it base64url-looking
        token += b64url(secrets.token_bytes(pad))[:pad]
    resp = {"token_type": "Bearer", "scope": USER_SCOPE if user else APP_SCOPE,
            "expires_in": ttl, "ext_expires_in": ttl, "access_token": token}
    with LOCK:
        ACCESS[token] = {"user": user, "app": not user, "exp": now + ttl}
        if user and refresh:
            rt = "rt." + secrets.token_urlsafe(40)
            REFRESH[rt] = {"user": user, "client_id": client_id}
            resp["refresh_token"] = rt
    return resp


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "oxbridge-test-idp/1.0"

    def log_message(self, fmt, *args):  # we write our own one-line log
        pass

    # ---------------------------------------------------------------- plumbing
    def form(self):
        """Query string + urlencoded or JSON body, one value per key."""
        url = urlsplit(self.path)
        out = {k: v[-1] for k, v in parse_qs(url.query).items()}
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if body.lstrip().startswith(b"{"):
            out.update(json.loads(body))
        elif body:
            out.update({k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()})
        return out

    def reply(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.status = status

    def handle_request(self):
        self.status, self.note = 0, ""
        path = urlsplit(self.path).path.rstrip("/")
        try:
            prm = self.form() if self.command == "POST" else \
                {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            if CONFIG["log_secrets"]:
                self.note += " params=%s" % json.dumps(prm)
            self.route(self.command, path, prm)
        except OAuthError as e:
            self.note += " error=%s" % e.error
            self.reply(e.status, {
                "error": e.error, "error_description": e.description, "error_codes": [e.code],
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())})
        except Exception as e:  # keep serving
            self.note += " exception=%r" % e
            self.reply(500, {"error": "server_error"})
        log("%s %s -> %d%s" % (self.command, path, self.status, self.note))

    do_GET = do_POST = handle_request

    def route(self, method, path, prm):
        if method == "POST" and path.endswith("/token"):
            return self.token(prm)
        if method == "POST" and path.endswith("/devicecode"):
            return self.devicecode(prm)
        if path == "/introspect":
            return self.introspect(prm)
        if path == "/health":
            return self.reply(200, {"ok": True})
        if path == "/admin/stats" and method == "GET":
            with LOCK:
                return self.reply(200, json.loads(json.dumps(STATS)))
        if path == "/admin/stats/reset" and method == "POST":
            with LOCK:
                inflight = STATS["token_inflight"]
                reset_stats()
                STATS["token_inflight"] = inflight
            return self.reply(200, {"reset": True})
        if path == "/admin/config":
            return self.admin_config(method, prm)
        if path == "/admin/revoke" and method == "POST":
            return self.admin_revoke(prm)
        if path == "/admin/issue" and method == "POST":
            if prm.get("app"):
                return self.reply(200, mint(None, "test-app", prm.get("expires_in")))
            user = (prm.get("user") or "").lower()
            if user not in USERS:
                return self.reply(400, {"error": "unknown user"})
            return self.reply(200, mint(user, "test-client", prm.get("expires_in")))
        self.reply(404, {"error": "not_found"})

    # ---------------------------------------------------------------- /token
    def client(self, prm, need_secret=False):
        cid, secret = prm.get("client_id"), prm.get("client_secret")
        auth = self.headers.get("Authorization") or ""
        if auth[:6].lower() == "basic ":
            try:
                cid, secret = map(unquote_plus, base64.b64decode(auth[6:]).decode().split(":", 1))
            except ValueError:
                raise OAuthError("invalid_client", status=401)
        if not cid:
            raise OAuthError("invalid_request", "client_id")
        if cid not in CLIENTS:
            raise OAuthError("unauthorized_client", cid)
        if (need_secret or secret is not None) and (CLIENTS[cid] is None or secret != CLIENTS[cid]):
            raise OAuthError("invalid_client", status=401)
        return cid

    def token(self, prm):
        grant = prm.get("grant_type") or "missing"
        self.note = " grant=%s" % grant
        key = "device_code" if grant == DEVICE_GRANT else grant
        with LOCK:
            STATS["token_requests"] += 1
            STATS["grant_requests"][key] = STATS["grant_requests"].get(key, 0) + 1
            STATS["token_inflight"] += 1
            STATS["token_inflight_max"] = max(STATS["token_inflight_max"], STATS["token_inflight"])
            fail = CONFIG["token_fail_count"] > 0
            if fail:
                CONFIG["token_fail_count"] -= 1
        try:
            time.sleep(CONFIG["token_delay_ms"] / 1000.0)
            if fail:
                raise OAuthError(CONFIG["token_fail_error"], status=int(CONFIG["token_fail_status"]),
                                 description="injected failure (token_fail_count).")
            self.reply(200, self.grant(grant, prm))
        finally:
            with LOCK:
                STATS["token_inflight"] -= 1

    def grant(self, grant, prm):
        if grant == "password":
            cid = self.client(prm)
            user = (prm.get("username") or "").lower()
            if USERS.get(user) is None or USERS[user] != prm.get("password"):
                raise OAuthError("invalid_grant")
            self.note += " user=%s" % user
            return mint(user, cid)
        if grant == "client_credentials":
            cid = self.client(prm, need_secret=True)
            return mint(None, cid)
        if grant == "refresh_token":
            cid = self.client(prm)
            with LOCK:  # strict rotation: a refresh token works exactly once
                rec = REFRESH.pop(prm.get("refresh_token") or "", None)
            if rec is None or rec["client_id"] != cid:
                raise OAuthError("invalid_grant", description="The provided value for the "
                                 "'refresh_token' is not valid (unknown, revoked or already redeemed).")
            self.note += " user=%s" % rec["user"]
            return mint(rec["user"], cid)
        if grant == DEVICE_GRANT:
            cid = self.client(prm)
            with LOCK:
                rec = DEVICES.get(prm.get("device_code") or "")
                if rec is None or rec["client_id"] != cid:
                    raise OAuthError("invalid_grant", description="Unknown or redeemed device_code.")
                if rec["exp"] < time.time():
                    raise OAuthError("expired_token")
                rec["polls"] += 1
                if rec["polls"] <= CONFIG["device_auto_approve_after"]:
                    raise OAuthError("authorization_pending")
                del DEVICES[prm["device_code"]]
            self.note += " user=%s" % rec["user"]
            return mint(rec["user"], cid)
        if grant == "missing":
            raise OAuthError("invalid_request", "grant_type")
        raise OAuthError("unsupported_grant_type", grant)

    def devicecode(self, prm):
        cid = self.client(prm)
        hint = (prm.get("login_hint") or "").lower()
        user = hint if hint in USERS else sorted(USERS)[0]
        dc = "dc." + secrets.token_urlsafe(32)
        uc = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        with LOCK:
            DEVICES[dc] = {"user": user, "client_id": cid, "polls": 0, "exp": time.time() + 900}
        uri = "https://microsoft.com/devicelogin"
        self.reply(200, {"device_code": dc, "user_code": uc, "verification_uri": uri,
                         "expires_in": 900, "interval": CONFIG["device_interval"],
                         "message": "To sign in, use a web browser to open the page %s and "
                                    "enter the code %s to authenticate." % (uri, uc)})

    # ---------------------------------------------------------------- /introspect
    def introspect(self, prm):
        purpose = prm.get("for", "")
        with LOCK:
            STATS["introspect_requests"] += 1
            fail = CONFIG["introspect_fail_count"] > 0
            if fail:
                CONFIG["introspect_fail_count"] -= 1
            rec = ACCESS.get(prm.get("token") or "")
        self.note = " for=%s" % (purpose or "-")
        if fail:
            self.note += " injected failure"
            return self.reply(500, {"error": "server_error"})
        if rec is None or rec["exp"] <= time.time() or \
                (purpose == "dovecot-user" and rec["app"]) or (purpose == "dovecot-app" and not rec["app"]):
            self.note += " active=false"
            return self.reply(200, {"active": False})
        # The app passdb compares only the domain (%Ld) of the login name with
        # the domain of this value, so an app token opens any mailbox of it.
        domain = sorted(USERS)[0].split("@", 1)[1]
        username = "*@" + domain if rec["app"] else rec["user"]
        self.note += " active=true user=%s" % username
        self.reply(200, {"active": True, "username": username, "exp": int(rec["exp"]),
                         "token_type": "Bearer"})

    # ---------------------------------------------------------------- admin
    def admin_config(self, method, prm):
        if method == "POST":
            bad = [k for k in prm if k not in CONFIG]
            if bad:
                return self.reply(400, {"error": "unknown keys", "keys": bad, "allowed": sorted(CONFIG)})
            with LOCK:
                for k, v in prm.items():
                    if isinstance(CONFIG[k], bool):
                        v = v is True or str(v).lower() in ("1", "true", "yes")
                    CONFIG[k] = type(CONFIG[k])(v)
            self.note = " set=%s" % ",".join(sorted(prm))
        self.reply(200, CONFIG)

    def admin_revoke(self, prm):
        user, token, everything = (prm.get("user") or "").lower(), prm.get("token"), bool(prm.get("all"))
        if not (user or token or everything):
            return self.reply(400, {"error": "give user, token or all"})
        n = 0
        with LOCK:
            for store in (ACCESS, REFRESH):
                for k in [k for k, v in store.items()
                          if everything or k == token or (user and v["user"] == user)]:
                    del store[k]
                    n += 1
        self.note = " revoked=%d" % n
        self.reply(200, {"revoked": n})


def main():
    ap = argparse.ArgumentParser(description="test OAuth2 IDP")
    ap.add_argument("--port", type=int, default=28080)
    ap.add_argument("--users", default="alice@example.test:alice-password bob@example.test:bob-password")
    ap.add_argument("--pidfile")
    a = ap.parse_args()
    for spec in a.users.split():
        user, password = spec.split(":", 1)
        USERS[user.lower()] = password
    reset_stats()
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    if a.pidfile:
        with open(a.pidfile + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(a.pidfile + ".tmp", a.pidfile)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    log("listening on http://127.0.0.1:%d (pid %d)" % (a.port, os.getpid()))
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        if a.pidfile and os.path.exists(a.pidfile):
            with open(a.pidfile) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(a.pidfile)
        log("stopped")


if __name__ == "__main__":
    main()
