#!/usr/bin/env python3
"""Tiny Entra-ID-like OAuth2 server for oxbridge's end-to-end tests (stdlib only), which
also speaks like Google's OAuth2 endpoints under /google/ (idp_google.py).

  GET  .../authorize    authorization code + PKCE (S256 only); consents at once
                        and redirects to redirect_uri (see authorize_deny, consent_as)
  POST .../token        grant_type password | client_credentials | refresh_token |
                        authorization_code | urn:ietf:params:oauth:grant-type:device_code
                        (tenant ttl-<N>, e.g. /ttl-90/oauth2/v2.0/token: N-second access tokens;
                        tenant idle-<N>: refresh tokens die after N s unused, AADSTS700082)
                        client_credentials with scope https://graph.microsoft.com/.default:
                        a Microsoft Graph token (roles Mail.Send + Mail.ReadWrite; tenant
                        nomailsend: no Mail.Send, tenant mailsendonly: no Mail.ReadWrite)
  POST .../devicecode   RFC 8628 device authorization (auto-approves, see config)
  /consumers/...        the tenant of personal Microsoft accounts (Outlook.com): delegated
                        grants only (password, client_credentials: AADSTS9001023); client
                        test-client-orgonly refused there (AADSTS700016, "not enabled for
                        consumers"), on other tenants it is like test-client
  POST /google/token    like https://oauth2.googleapis.com/token: grant_type
                        urn:ietf:params:oauth:grant-type:jwt-bearer (service account JWT signed
                        RS256, domain-wide delegation with sub), refresh_token (not rotated),
                        authorization_code (PKCE); answers and errors like Google's
  GET  /google/auth     like https://accounts.google.com/o/oauth2/v2/auth; consents at once
  POST /google/device/code  refuses https://mail.google.com/ (invalid_scope), like Google
  POST /introspect      RFC 7662, called by Dovecot's oauth2 passdbs
                        (?for=dovecot-user or ?for=dovecot-app) and by graph.py (?for=graph)
  GET  /health
  GET  /admin/stats     POST /admin/stats/reset
  GET|POST /admin/config                 runtime knobs (JSON object, see CONFIG)
  POST /admin/revoke    {"user": ..} | {"token": ..} | {"all": true}
  POST /admin/issue     {"user": .., "expires_in": n} | {"app": true}
                        | {"app": true, "scope": GRAPH_SCOPE, "roles": [..]}
  GET  /admin/device    device codes not yet redeemed: user_code, user, polls, state
  POST /admin/device/approve {"user_code": .., "user": ..}   (user optional)
  POST /admin/device/deny    {"user_code": ..}
  POST /admin/device/expire  {"user_code": ..}
  GET  /admin/google    registered Google service accounts and OAuth clients
  POST /admin/google/service-account {"client_email", "public_key_pem", "private_key_id",
                        "client_id", "delegated_scopes": [..]} (google_sa.py makes and registers)
  POST /admin/google/client {"client_id", "client_secret", "redirect_uris": [..]}
  POST /admin/google/revoke {"user": ..} | {"token": ..} | {"all": true}

Tokens live in memory only. Binds to 127.0.0.1. Google access tokens of a user introspect like
Entra delegated tokens of that user (?for=dovecot-user).
"""

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idp_google  # noqa: E402  (Google's endpoints, under /google/)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_SCOPE = ("https://outlook.office.com/IMAP.AccessAsUser.All "
              "https://outlook.office.com/POP.AccessAsUser.All "
              "https://outlook.office.com/SMTP.Send offline_access")
APP_SCOPE = "https://outlook.office365.com/.default"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_SCOPE = GRAPH_RESOURCE + "/.default"
GRAPH_ROLES = ["Mail.ReadWrite", "Mail.Send"]  # application permissions of test-app on Graph
# tenant segment -> the Graph application roles its client_credentials tokens carry
GRAPH_TENANT_ROLES = {"nomailsend": ["Mail.ReadWrite"], "mailsendonly": ["Mail.Send"]}
CLIENTS = {"test-client": None, "test-app": "test-app-secret",  # client_id -> secret
           "test-client-orgonly": None}
ORG_ONLY_CLIENTS = {"test-client-orgonly"}  # registered for work/school accounts only
CONSUMERS = "consumers"  # the tenant segment of personal Microsoft accounts (Outlook.com)
CONSUMERS_CLIENT_TEXT = ("The client does not exist or is not enabled for consumers. If you are the "
                         "application developer, configure a new application through the App "
                         "Registrations in the Azure Portal at https://go.microsoft.com/fwlink/?linkid=2083908.")
CONSUMERS_GRANT_TEXT = ("The grant type is not supported over the /common or /consumers endpoints. "
                        "Please use the /organizations or tenant-specific endpoint.")

CONFIG = {  # runtime knobs, changed with POST /admin/config
    "access_ttl": 3600,
    "access_token_min_len": 0,
    "token_delay_ms": 0,
    "token_fail_count": 0,
    "token_fail_status": 503,
    "token_fail_error": "temporarily_unavailable",
    "introspect_fail_count": 0,
    "device_interval": 1,
    "device_auto_approve_after": 1,  # -1: never, only POST /admin/device/approve
    "device_slow_down_polls": 0,  # the first N polls of each device code get slow_down
    "authorize_deny": False,  # /authorize redirects with error=access_denied
    "consent_as": "",  # /authorize and /google/auth: this user consents, whatever login_hint says
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
    "authorization_declined": (70000, "The user denied the authorization request."),
    "slow_down": (50000, "OAuth 2.0 device flow error. Polling too fast: slow down "
                         "(add 5 seconds to the interval)."),
    "temporarily_unavailable": (90033, "A transient error has occurred. Please try again."),
    "invalid_scope": (1002012, "The provided value for scope %s is not valid. Client credential "
                               "flows must have a scope value with /.default suffixed to the "
                               "resource identifier (application ID URI)."),
}

USERS = {}        # lower-case email -> password
LOCK = threading.Lock()
ACCESS = {}       # access token -> {"user": str|None, "app": bool, "exp": float,
                  #   "aud": "outlook"|"graph", "roles": [str] (Graph app tokens)}
REFRESH = {}      # refresh token -> {"user": str, "client_id": str}  (deleted when used)
DEVICES = {}      # device_code -> {"user": str, "client_id": str, "polls": int, "exp": float,
                  #   "user_code": str, "state": pending|approved|denied|expired,
                  #   "slow_downs": int, "created": float}  (deleted when redeemed)
CODES = {}        # authorization code -> {"client_id", "redirect_uri", "challenge", "user",
                  #   "scope", "exp": float, "used": bool}  (kept a while after use)
USED_REFRESH = set()  # refresh tokens consumed by rotation (to count reuse)
CODE_TTL = 120
DEVICE_TTL = 900
USER_CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
STATS = {}


def reset_stats():
    STATS.clear()
    STATS.update(token_requests=0, grant_requests={}, token_inflight=0,
                 token_inflight_max=0, introspect_requests=0, authorize_requests=0,
                 refresh_reuse_rejected=0, graph_introspect_requests=0)
    idp_google.reset_stats(STATS)


def log(msg):
    sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class OAuthError(Exception):
    def __init__(self, error, arg="", status=400, description=None, code=None):
        super().__init__(error)
        default, text = AADSTS.get(error, (50000, "%s"))
        code = code or default
        self.error, self.status, self.code = error, status, code
        self.description = "AADSTS%d: %s" % (code, description or (text % arg if "%s" in text else text))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tenant_ttl(path):
    """N for a token URL whose tenant segment is ttl-<N> (/ttl-90/oauth2/v2.0/token), else None."""
    parts = path.strip("/").split("/")
    m = re.fullmatch(r"ttl-(\d{1,7})", parts[0]) if len(parts) > 1 else None
    return int(m.group(1)) if m else None


def tenant_of(path):
    """The tenant segment of an Entra URL (/consumers/oauth2/v2.0/token -> consumers), lower case."""
    parts = path.strip("/").split("/")
    return parts[0].lower() if len(parts) > 1 else ""


def tenant_idle(path):
    """N for a token URL whose tenant segment is idle-<N>: refresh tokens issued there die
    after N seconds unused (Entra's inactivity rule, AADSTS700082, in seconds), else None."""
    parts = path.strip("/").split("/")
    m = re.fullmatch(r"idle-(\d{1,7})", parts[0]) if len(parts) > 1 else None
    return int(m.group(1)) if m else None


def tenant_graph_roles(path):
    """The Graph roles for app tokens issued under this token URL's tenant segment."""
    parts = path.strip("/").split("/")
    tenant = parts[0].lower() if len(parts) > 1 else ""
    return list(GRAPH_TENANT_ROLES.get(tenant, GRAPH_ROLES))


def graph_scope(scope):
    """True if a client_credentials scope asks for Microsoft Graph. Any other scope (or none)
    gets the Exchange Online app token, as before. Graph scopes other than /.default are
    refused like Entra does (AADSTS1002012)."""
    names = [s for s in (scope or "").split() if s.lower().startswith(GRAPH_RESOURCE + "/")]
    if not names:
        return False
    bad = [s for s in names if s.lower() != GRAPH_SCOPE]
    if bad:
        raise OAuthError("invalid_scope", bad[0])
    return True


def mint(user, client_id, ttl=None, refresh=True, idle=None, graph_roles=None):
    """A JWT-looking opaque access token (+ refresh token for delegated grants).
    graph_roles (a list, app tokens only): a Microsoft Graph token with those roles."""
    ttl = CONFIG["access_ttl"] if ttl is None else int(ttl)
    now = int(time.time())
    graph = graph_roles is not None and not user
    claims = {"aud": GRAPH_RESOURCE if graph else "https://outlook.office.com", "appid": client_id,
              "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
    if user:
        claims.update(upn=user, scp="IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send")
    elif graph:
        claims["roles"] = list(graph_roles)
    else:
        claims["roles"] = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
    head = b64url(b'{"typ":"JWT","alg":"RS256"}')
    token = "%s.%s.%s" % (head, b64url(json.dumps(claims).encode()), secrets.token_urlsafe(32))
    pad = CONFIG["access_token_min_len"] - len(token)
    if pad > 0:  # Exchange's tokens are 1.5-3 KB; keep it base64url-looking
        token += b64url(secrets.token_bytes(pad))[:pad]
    resp = {"token_type": "Bearer", "scope": USER_SCOPE if user else GRAPH_SCOPE if graph else APP_SCOPE,
            "expires_in": ttl, "ext_expires_in": ttl, "access_token": token}
    with LOCK:
        ACCESS[token] = {"user": user, "app": not user, "exp": now + ttl,
                         "aud": "graph" if graph else "outlook", "roles": claims.get("roles", [])}
        if user and refresh:
            rt = "rt." + secrets.token_urlsafe(40)
            REFRESH[rt] = {"user": user, "client_id": client_id, "idle": idle, "issued": now}
            resp["refresh_token"] = rt
    return resp


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "oxbridge-test-idp/1.0"
    # headers and body go out as two writes: without this, a second request
    # on a kept-alive connection waits ~40 ms for the client's delayed ACK
    disable_nagle_algorithm = True

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

    def redirect(self, uri, params):
        """302 to uri with params added to its query (None values left out)."""
        query = urlencode([(k, v) for k, v in params if v is not None])
        sep = "" if uri.endswith(("?", "&")) else "&" if "?" in uri else "?"
        self.send_response(302)
        self.send_header("Location", uri + sep + query)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.status = 302

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
        self.tenant = tenant_of(path)
        if path.startswith(("/google/", "/admin/google/")) or path == "/admin/google":
            return GOOGLE.route(self, method, path, prm)
        if method == "POST" and path.endswith("/token"):
            self.graph_roles = tenant_graph_roles(path)
            return self.token(prm, tenant_ttl(path), tenant_idle(path))
        if method == "POST" and path.endswith("/devicecode"):
            return self.devicecode(prm)
        if method == "GET" and path.endswith("/authorize"):
            return self.authorize(prm)
        if path == "/introspect":
            return self.introspect(prm)
        if path == "/health":
            return self.reply(200, {"ok": True})
        if path == "/admin/stats" and method == "GET":
            with LOCK:
                return self.reply(200, json.loads(json.dumps(STATS)))
        if path == "/admin/stats/reset" and method == "POST":
            with LOCK:
                inflight, google_inflight = STATS["token_inflight"], STATS["google_token_inflight"]
                reset_stats()
                STATS["token_inflight"], STATS["google_token_inflight"] = inflight, google_inflight
            return self.reply(200, {"reset": True})
        if path == "/admin/config":
            return self.admin_config(method, prm)
        if path == "/admin/revoke" and method == "POST":
            return self.admin_revoke(prm)
        if path == "/admin/issue" and method == "POST":
            if prm.get("app"):
                roles = None
                if graph_scope(prm.get("scope")):
                    roles = prm.get("roles", GRAPH_ROLES)
                    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                        return self.reply(400, {"error": "roles must be a list of strings"})
                return self.reply(200, mint(None, "test-app", prm.get("expires_in"), graph_roles=roles))
            user = (prm.get("user") or "").lower()
            if user not in USERS:
                return self.reply(400, {"error": "unknown user"})
            return self.reply(200, mint(user, "test-client", prm.get("expires_in")))
        if path == "/admin/device" and method == "GET":
            return self.admin_device_list(prm)
        if path in ("/admin/device/approve", "/admin/device/deny", "/admin/device/expire") \
                and method == "POST":
            return self.admin_device_set(path.rsplit("/", 1)[1], prm)
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
        if cid in ORG_ONLY_CLIENTS and self.tenant == CONSUMERS:
            raise OAuthError("unauthorized_client", description=CONSUMERS_CLIENT_TEXT)
        if (need_secret or secret is not None) and (CLIENTS[cid] is None or secret != CLIENTS[cid]):
            raise OAuthError("invalid_client", status=401)
        return cid

    def token(self, prm, ttl=None, idle=None):
        """ttl: access token lifetime from the tenant segment (None: access_ttl); idle: the
        refresh tokens' inactivity limit from the tenant segment (None: none)."""
        self.idle = idle
        grant = prm.get("grant_type") or "missing"
        self.note = " grant=%s" % grant + ("" if ttl is None else " ttl=%d" % ttl)
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
            self.reply(200, self.grant(grant, prm, ttl))
        finally:
            with LOCK:
                STATS["token_inflight"] -= 1

    def grant(self, grant, prm, ttl):
        if self.tenant == CONSUMERS and grant in ("password", "client_credentials"):
            # personal accounts: delegated grants only (refused before the client is looked at)
            raise OAuthError("invalid_request", code=9001023, description=CONSUMERS_GRANT_TEXT)
        if grant == "password":
            cid = self.client(prm)
            user = (prm.get("username") or "").lower()
            if USERS.get(user) is None or USERS[user] != prm.get("password"):
                raise OAuthError("invalid_grant")
            self.note += " user=%s" % user
            return mint(user, cid, ttl, idle=self.idle)
        if grant == "client_credentials":
            cid = self.client(prm, need_secret=True)
            if graph_scope(prm.get("scope")):
                self.note += " resource=graph roles=%s" % ",".join(self.graph_roles)
                return mint(None, cid, ttl, graph_roles=self.graph_roles)
            return mint(None, cid, ttl)
        if grant == "refresh_token":
            cid = self.client(prm)
            rt = prm.get("refresh_token") or ""
            with LOCK:  # strict rotation: a refresh token works exactly once
                rec = REFRESH.pop(rt, None)
                if rec is not None and rec.get("provider"):  # Google's: not for this endpoint
                    REFRESH[rt] = rec
                    rec = None
                if rec is not None and rec.get("idle") is not None \
                        and time.time() - rec["issued"] > rec["idle"]:
                    REFRESH[rt] = rec  # dead of inactivity, and stays so
                elif rec is None and rt in USED_REFRESH:
                    STATS["refresh_reuse_rejected"] += 1
                    self.note += " reuse"
                elif rec is not None and rec["client_id"] == cid:
                    USED_REFRESH.add(rt)
            if rec is None or rec["client_id"] != cid:
                raise OAuthError("invalid_grant", description="The provided value for the "
                                 "'refresh_token' is not valid (unknown, revoked or already redeemed).")
            if rec.get("idle") is not None and time.time() - rec["issued"] > rec["idle"]:
                self.note += " inactive"
                raise OAuthError("invalid_grant", code=700082, description="The refresh token has "
                                 "expired due to inactivity. The token was issued on %s and was "
                                 "inactive for %d seconds." % (
                                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["issued"])),
                                     rec["idle"]))
            self.note += " user=%s" % rec["user"]
            return mint(rec["user"], cid, ttl, idle=rec.get("idle"))
        if grant == "authorization_code":
            return self.redeem_code(prm, ttl)
        if grant == DEVICE_GRANT:
            cid = self.client(prm)
            dc = prm.get("device_code") or ""
            with LOCK:
                rec = DEVICES.get(dc)
                if rec is None or rec["client_id"] != cid:
                    raise OAuthError("invalid_grant", description="Unknown or redeemed device_code.")
                rec["polls"] += 1  # every poll, slow_down and refusals included
                if rec["state"] == "expired" or rec["exp"] < time.time():
                    rec["state"] = "expired"
                    raise OAuthError("expired_token")
                if rec["state"] == "denied":
                    raise OAuthError("authorization_declined")
                if rec["slow_downs"] < CONFIG["device_slow_down_polls"]:
                    rec["slow_downs"] += 1
                    raise OAuthError("slow_down")
                after = CONFIG["device_auto_approve_after"]  # < 0: only the admin approves
                if rec["state"] != "approved" and (after < 0 or rec["polls"] - rec["slow_downs"] <= after):
                    raise OAuthError("authorization_pending")
                del DEVICES[dc]
            self.note += " user=%s" % rec["user"]
            return mint(rec["user"], cid, ttl, idle=self.idle)
        if grant == "missing":
            raise OAuthError("invalid_request", "grant_type")
        raise OAuthError("unsupported_grant_type", grant)

    def devicecode(self, prm):
        cid = self.client(prm)
        hint = (prm.get("login_hint") or "").lower()
        user = hint if hint in USERS else sorted(USERS)[0]
        dc = "dc." + secrets.token_urlsafe(32)
        now = time.time()
        with LOCK:
            for k in [k for k, v in DEVICES.items() if v["exp"] < now - 3600]:
                del DEVICES[k]  # long expired and never redeemed
            taken = {v["user_code"] for v in DEVICES.values()}
            uc = None
            while uc is None or uc in taken:
                uc = "".join(secrets.choice(USER_CODE_CHARS) for _ in range(9))
            DEVICES[dc] = {"user": user, "client_id": cid, "polls": 0, "exp": now + DEVICE_TTL,
                           "user_code": uc, "state": "pending", "slow_downs": 0, "created": now}
        self.note = " user=%s user_code=%s" % (user, uc)
        uri = "https://microsoft.com/devicelogin"
        self.reply(200, {"device_code": dc, "user_code": uc, "verification_uri": uri,
                         "verification_uri_complete": uri + "?" + urlencode({"otc": uc}),
                         "expires_in": DEVICE_TTL, "interval": CONFIG["device_interval"],
                         "message": "To sign in, use a web browser to open the page %s and "
                                    "enter the code %s to authenticate." % (uri, uc)})

    # ---------------------------------------------------------------- /authorize + code grant
    def authorize(self, prm):
        """Authorization endpoint, code flow with PKCE (S256). Consent is automatic."""
        with LOCK:
            STATS["authorize_requests"] += 1
        cid, uri, state = prm.get("client_id"), prm.get("redirect_uri"), prm.get("state")
        if not cid:
            raise OAuthError("invalid_request", "client_id")
        if cid not in CLIENTS:
            raise OAuthError("unauthorized_client", cid)
        if cid in ORG_ONLY_CLIENTS and self.tenant == CONSUMERS:
            raise OAuthError("unauthorized_client", description=CONSUMERS_CLIENT_TEXT)
        if not uri:  # nowhere to redirect to
            raise OAuthError("invalid_request", "redirect_uri")
        self.note = " client=%s" % cid

        def fail(error, code, text):
            self.note += " error=%s" % error
            self.redirect(uri, [("error", error), ("error_description", "AADSTS%d: %s" % (code, text)),
                                ("state", state)])

        rtype = prm.get("response_type") or ""
        if rtype != "code":
            return fail("unsupported_response_type", 70005,
                        "response_type '%s' is not supported; use 'code'." % rtype)
        for name in ("scope", "code_challenge", "code_challenge_method"):
            if not prm.get(name):
                return fail("invalid_request", 900144,
                            "The request body must contain the following parameter: '%s'." % name)
        if prm["code_challenge_method"] != "S256":
            return fail("invalid_request", 501491, "Invalid code_challenge_method '%s': only S256 "
                        "is supported." % prm["code_challenge_method"])
        challenge = prm["code_challenge"]
        if len(challenge) != 43 or challenge.strip(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
            return fail("invalid_request", 501491, "Invalid size or characters of code_challenge "
                        "(S256: 43 base64url characters).")
        hint = (prm.get("login_hint") or "").lower()
        if hint and hint not in USERS:
            return fail("invalid_request", 50034, "The user account %s does not exist in the "
                        "directory." % hint)
        user = CONFIG["consent_as"].lower() or hint or sorted(USERS)[0]
        self.note += " user=%s" % user
        if CONFIG["authorize_deny"]:
            return fail("access_denied", 65004, "User declined to consent to access the app.")
        code = "ac." + secrets.token_urlsafe(48)
        now = time.time()
        with LOCK:
            for k in [k for k, v in CODES.items() if v["exp"] < now - 3600]:
                del CODES[k]
            CODES[code] = {"client_id": cid, "redirect_uri": uri, "challenge": challenge, "user": user,
                           "scope": prm["scope"], "exp": now + CODE_TTL, "used": False}
        self.redirect(uri, [("code", code), ("state", state)])

    def redeem_code(self, prm, ttl=None):
        """grant_type=authorization_code: single use, bound to client, redirect_uri and PKCE."""
        cid = self.client(prm)
        code, uri, verifier = prm.get("code"), prm.get("redirect_uri"), prm.get("code_verifier") or ""
        for name, value in (("code", code), ("redirect_uri", uri)):
            if not value:
                raise OAuthError("invalid_request", name)
        with LOCK:
            rec = CODES.get(code)
            if rec is None:
                raise OAuthError("invalid_grant", code=70008, description="The provided authorization "
                                 "code is not valid (unknown or expired). Send a new interactive "
                                 "authorization request for this user and resource.")
            if rec["used"]:
                raise OAuthError("invalid_grant", code=54005,
                                 description="OAuth2 Authorization code was already redeemed, please "
                                             "retry with a new valid code or use an existing refresh token.")
            if rec["exp"] < time.time():
                raise OAuthError("invalid_grant", code=70008, description="The provided authorization "
                                 "code has expired. Send a new interactive authorization request for "
                                 "this user and resource.")
            if rec["client_id"] != cid:
                raise OAuthError("invalid_grant", code=70000, description="The authorization code was "
                                 "issued to another client.")
            if rec["redirect_uri"] != uri:
                raise OAuthError("invalid_grant", code=50011, description="The redirect URI '%s' does "
                                 "not match the one of the authorization request." % uri)
            if not secrets.compare_digest(b64url(hashlib.sha256(verifier.encode()).digest()),
                                          rec["challenge"]):
                raise OAuthError("invalid_grant", code=501481, description="The Code_Verifier does not "
                                 "match the code_challenge supplied in the authorization request.")
            rec["used"] = True
        self.note += " user=%s" % rec["user"]
        return mint(rec["user"], cid, ttl, idle=self.idle)

    # ---------------------------------------------------------------- /introspect
    def introspect(self, prm):
        purpose = prm.get("for", "")
        if purpose == "graph":
            return self.introspect_graph(prm)
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
        if rec is None or rec["exp"] <= time.time() or rec.get("aud") not in ("outlook", "google") or \
                (purpose == "dovecot-user" and rec["app"]) or (purpose == "dovecot-app" and not rec["app"]):
            # a Graph token is for https://graph.microsoft.com only: Exchange's IMAP, POP and
            # SMTP refuse it like any other token of the wrong audience. Likewise a Google token
            # of a service account itself, or one without https://mail.google.com/ (aud
            # "google-other"): Gmail opens no mailbox with it
            self.note += " active=false"
            return self.reply(200, {"active": False})
        # The app passdb compares only the domain (%Ld) of the login name with
        # the domain of this value, so an app token opens any mailbox of it.
        domain = sorted(USERS)[0].split("@", 1)[1]
        username = "*@" + domain if rec["app"] else rec["user"]
        self.note += " active=true user=%s" % username
        self.reply(200, {"active": True, "username": username, "exp": int(rec["exp"]),
                         "token_type": "Bearer"})

    def introspect_graph(self, prm):
        """For graph.py: what the token is, so that graph.py can answer like Graph does (wrong
        audience, expired, missing role). Not subject to introspect_fail_count, and counted
        apart (graph_introspect_requests), so Dovecot's knobs and counters stay as they were."""
        with LOCK:
            STATS["graph_introspect_requests"] += 1
            rec = ACCESS.get(prm.get("token") or "")
            rec = dict(rec) if rec else None
        self.note = " for=graph"
        if rec is None:
            self.note += " active=false reason=unknown"
            return self.reply(200, {"active": False, "reason": "unknown"})
        if rec["exp"] <= time.time():
            self.note += " active=false reason=expired"
            return self.reply(200, {"active": False, "reason": "expired", "exp": int(rec["exp"])})
        aud = GRAPH_RESOURCE if rec.get("aud") == "graph" else "https://outlook.office.com"
        self.note += " active=true aud=%s" % aud
        self.reply(200, {"active": True, "aud": aud, "app": rec["app"], "username": rec["user"],
                         "roles": rec.get("roles", []), "exp": int(rec["exp"]),
                         "token_type": "Bearer"})

    # ---------------------------------------------------------------- admin
    def admin_config(self, method, prm):
        if method == "POST":
            bad = [k for k in prm if k not in CONFIG]
            if bad:
                return self.reply(400, {"error": "unknown keys", "keys": bad, "allowed": sorted(CONFIG)})
            if "consent_as" in prm:  # "" or null: off
                prm["consent_as"] = str(prm["consent_as"] or "").lower()
                if prm["consent_as"] and prm["consent_as"] not in USERS:
                    return self.reply(400, {"error": "unknown user", "consent_as": prm["consent_as"]})
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

    @staticmethod
    def device_state(rec, now):
        return "expired" if rec["exp"] < now else rec["state"]

    def admin_device_list(self, prm):
        """Device codes not yet redeemed, oldest first (?state=.. and ?user=.. filter)."""
        now, out = time.time(), []
        with LOCK:
            for dc, rec in sorted(DEVICES.items(), key=lambda kv: kv[1]["created"]):
                item = {"user_code": rec["user_code"], "user": rec["user"], "polls": rec["polls"],
                        "state": self.device_state(rec, now), "client_id": rec["client_id"],
                        "expires_in": max(0, int(rec["exp"] - now)), "device_code": dc}
                if prm.get("state") in (None, item["state"]) and \
                        (prm.get("user") or "").lower() in ("", item["user"]):
                    out.append(item)
        self.reply(200, out)

    def admin_device_set(self, action, prm):
        uc = (prm.get("user_code") or "").upper().replace("-", "").replace(" ", "")
        user = (prm.get("user") or "").lower()
        if not uc:
            return self.reply(400, {"error": "give user_code"})
        if action == "approve" and user and user not in USERS:
            return self.reply(400, {"error": "unknown user"})
        with LOCK:
            rec = next((r for r in DEVICES.values() if r["user_code"] == uc), None)
            if rec is None:
                return self.reply(404, {"error": "unknown or redeemed user_code"})
            state = self.device_state(rec, time.time())
            if action == "approve":
                if state not in ("pending", "approved"):
                    return self.reply(409, {"error": "device code is %s" % state, "state": state})
                rec["state"] = "approved"
                rec["user"] = user or rec["user"]
            else:
                rec["state"] = "denied" if action == "deny" else "expired"
            out = {"user_code": uc, "user": rec["user"], "polls": rec["polls"], "state": rec["state"]}
        self.note = " user_code=%s state=%s" % (uc, out["state"])
        self.reply(200, out)


GOOGLE = idp_google.Google(sys.modules[__name__])


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
