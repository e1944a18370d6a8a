"""Google-like OAuth2 endpoints for idp.py (python3 stdlib; the openssl command reads keys).

idp.py routes /google/... and /admin/google... here and shares its token stores with this
module: a Google access token for a user goes into idp.py's ACCESS like an Entra delegated
token, so Dovecot's POST /introspect?for=dovecot-user accepts it for that user, and Google
refresh tokens live in idp.py's REFRESH (marked "provider": "google").

  POST /google/token        like https://oauth2.googleapis.com/token:
                            grant_type urn:ietf:params:oauth:grant-type:jwt-bearer (a service
                            account's RS256 JWT, domain-wide delegation with "sub"),
                            refresh_token (not rotated), authorization_code (PKCE)
  GET  /google/auth         like https://accounts.google.com/o/oauth2/v2/auth; consents at once
  POST /google/device/code  like https://oauth2.googleapis.com/device/code: refuses the scopes
                            Google does not allow there (https://mail.google.com/ among them)
  GET  /admin/google                    registered service accounts and clients
  POST /admin/google/service-account    {"client_email", "public_key_pem", "private_key_id",
                                         "client_id", "delegated_scopes": [..]} (or "delete")
  POST /admin/google/client             {"client_id", "client_secret", "redirect_uris"} (or "delete")
  POST /admin/google/revoke             {"user": ..} | {"token": ..} | {"all": true}

Error bodies are Google's: {"error": .., "error_description": ..}. The texts are Google's where
Google's are known (see README.md for which).
"""

import base64
import hashlib
import hmac
import html
import json
import re
import secrets
import subprocess
import time
from urllib.parse import unquote_plus

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
MAIL_SCOPE = "https://mail.google.com/"
# The only scopes Google's device flow allows (its "limited-input device" guide).
DEVICE_SCOPES = {
    "openid", "email", "profile",
    "https://www.googleapis.com/auth/userinfo.email",
    "https://www.googleapis.com/auth/userinfo.profile",
    "https://www.googleapis.com/auth/drive.appdata",
    "https://www.googleapis.com/auth/drive.file",
    "https://www.googleapis.com/auth/youtube",
    "https://www.googleapis.com/auth/youtube.readonly",
}
MAX_JWT_LIFETIME = 3600
MAX_IAT_SKEW = 60
CODE_TTL = 600
# DER of the SHA-256 DigestInfo prefix (RFC 8017, 9.2, note 1)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

MSG_SIGNATURE = "Invalid JWT Signature."
MSG_TIME = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
            "timeframe. Check your iat and exp values in the JWT claim.")
MSG_AUDIENCE = "Invalid JWT: Failed audience check."
MSG_ACCOUNT = "Invalid grant: account not found"
MSG_USER = "Invalid email or User ID"
MSG_SCOPE = "Invalid OAuth scope or ID token audience provided."
MSG_DELEGATION = ("Client is unauthorized to retrieve access tokens using this method, or client "
                  "not authorized for any of the scopes requested.")
MSG_REVOKED = "Token has been expired or revoked."
MSG_NO_CLIENT = "The OAuth client was not found."

SERVICE_ACCOUNTS = {}  # client_email (lower case) -> {"client_email", "client_id", "private_key_id",
                       #   "n": int, "e": int, "delegated_scopes": [str]}
CLIENTS = {}           # client_id -> {"secret": str|None (public client), "redirect_uris": [str]|None}
CODES = {}             # code -> {"client_id", "redirect_uri", "challenge", "method", "user", "scope",
                       #   "offline": bool, "exp": float, "used": bool}
OFFLINE = set()        # (client_id, user): already given a refresh token; Google gives the next
                       # one only with prompt=consent (forgotten by /admin/google/revoke)


def reset_stats(stats):
    """The Google keys of idp.py's STATS (called by idp.py's reset_stats)."""
    stats.update(google_token_requests=0, google_grant_requests={}, google_token_inflight=0,
                 google_token_inflight_max=0, google_authorize_requests=0,
                 google_jwt_requests=0, google_jwt_subs={}, google_jwt_pairs={})


class GoogleError(Exception):
    def __init__(self, error, description, status=400):
        super().__init__(error)
        self.error, self.description, self.status = error, description, status


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    """Strict base64url without padding (as in a JWS compact serialization)."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rsa_public_numbers(pem):
    """(n, e) of an RSA public key in PEM ("BEGIN PUBLIC KEY"), read by the openssl command."""
    if not isinstance(pem, str) or "-----BEGIN PUBLIC KEY-----" not in pem:
        raise ValueError("public_key_pem must be a PEM public key (-----BEGIN PUBLIC KEY-----)")
    out = subprocess.run(["openssl", "rsa", "-pubin", "-noout", "-text", "-modulus"],
                         input=pem.encode(), capture_output=True, timeout=20)
    text = out.stdout.decode("ascii", "replace")
    n = re.search(r"^Modulus=([0-9A-Fa-f]+)\s*$", text, re.M)
    e = re.search(r"^(?:Exponent|publicExponent): (\d+)", text, re.M)
    if out.returncode or not n or not e:
        raise ValueError("not an RSA public key: %s" % out.stderr.decode("utf-8", "replace").strip()[:300])
    return int(n.group(1), 16), int(e.group(1))


def rsa_verify_sha256(n, e, message, signature):
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017, 8.2.2): the whole encoded message is compared."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    em = pow(s, e, n).to_bytes(k, "big")
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    if k < len(t) + 11:
        return False
    return hmac.compare_digest(em, b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def peek_claims(assertion):
    """The JWT's claims without any check (for the statistics), or {}."""
    try:
        claims = json.loads(b64url_decode(assertion.split(".")[1]))
        return claims if isinstance(claims, dict) else {}
    except (AttributeError, IndexError, ValueError, UnicodeDecodeError):
        return {}


def loopback(uri):
    m = re.fullmatch(r"http://(127\.0\.0\.1|\[::1\]|localhost)(:\d+)?(/.*)?", uri)
    return m and (m.group(1), m.group(3) or "/")


def redirect_allowed(client, uri):
    """Registered redirect URIs must match exactly; for a loopback one the port may differ
    (Google's rule for desktop apps). No list registered: any URI."""
    allowed = client["redirect_uris"]
    if allowed is None:
        return True
    if uri in allowed:
        return True
    lb = loopback(uri)
    return bool(lb) and any(loopback(a) == lb for a in allowed)


class Google:
    def __init__(self, core):
        self.core = core  # the idp module: ACCESS, REFRESH, USERS, STATS, CONFIG, LOCK

    # ------------------------------------------------------------ routing
    def route(self, h, method, path, prm):
        try:
            if path == "/google/token" and method == "POST":
                return self.token(h, prm)
            if path == "/google/auth" and method == "GET":
                return self.auth(h, prm)
            if path == "/google/device/code" and method == "POST":
                return self.device_code(h, prm)
            if path == "/admin/google" and method == "GET":
                return self.admin_list(h)
            if path == "/admin/google/service-account" and method == "POST":
                return self.admin_service_account(h, prm)
            if path == "/admin/google/client" and method == "POST":
                return self.admin_client(h, prm)
            if path == "/admin/google/revoke" and method == "POST":
                return self.admin_revoke(h, prm)
        except GoogleError as e:
            h.note += " error=%s" % e.error
            return h.reply(e.status, {"error": e.error, "error_description": e.description})
        h.reply(404, {"error": "not_found"})

    # ------------------------------------------------------------ /google/token
    def token(self, h, prm):
        c = self.core
        grant = prm.get("grant_type") or ""
        key = "jwt_bearer" if grant == JWT_GRANT else grant or "missing"
        h.note = " google grant=%s" % key
        who = pair = None
        if grant == JWT_GRANT:
            claims = peek_claims(prm.get("assertion"))
            who = claims.get("sub") or claims.get("iss") or ""
            who = who.lower() if isinstance(who, str) else json.dumps(who)
            # "iss sub": a test with its own service account counts its own requests
            pair = "%s %s" % (claims.get("iss"), claims.get("sub"))
        with c.LOCK:
            st = c.STATS
            st["google_token_requests"] += 1
            st["google_grant_requests"][key] = st["google_grant_requests"].get(key, 0) + 1
            st["google_token_inflight"] += 1
            st["google_token_inflight_max"] = max(st["google_token_inflight_max"], st["google_token_inflight"])
            if who is not None:
                st["google_jwt_requests"] += 1
                st["google_jwt_subs"][who] = st["google_jwt_subs"].get(who, 0) + 1
                st["google_jwt_pairs"][pair] = st["google_jwt_pairs"].get(pair, 0) + 1
            fail = c.CONFIG["token_fail_count"] > 0
            if fail:
                c.CONFIG["token_fail_count"] -= 1
        try:
            time.sleep(c.CONFIG["token_delay_ms"] / 1000.0)
            if fail:
                h.note += " injected failure"
                raise GoogleError(c.CONFIG["token_fail_error"], "injected failure (token_fail_count).",
                                  int(c.CONFIG["token_fail_status"]))
            if grant == JWT_GRANT:
                body = self.jwt_bearer(h, prm)
            elif grant == "refresh_token":
                body = self.refresh(h, prm)
            elif grant == "authorization_code":
                body = self.redeem(h, prm)
            else:
                raise GoogleError("unsupported_grant_type", "Invalid grant_type: %s" % grant)
            h.reply(200, body)
        finally:
            with c.LOCK:
                c.STATS["google_token_inflight"] -= 1

    def mint(self, user, client_id, scope, refresh=False):
        """An opaque ya29. access token in idp.py's ACCESS (+ a refresh token in REFRESH).
        user None: a token of the service account itself, which no mailbox accepts; a token
        without https://mail.google.com/ opens no mailbox either (Gmail's IMAP and SMTP need it)."""
        c = self.core
        ttl = int(c.CONFIG["access_ttl"])
        now = time.time()
        token = "ya29." + secrets.token_urlsafe(160)
        aud = "google" if user and MAIL_SCOPE in scope.split() else "google-other"
        out = {"access_token": token, "expires_in": max(ttl - 1, 0)}  # Google says 3599 for an hour
        with c.LOCK:
            c.ACCESS[token] = {"user": user, "app": False, "exp": now + ttl, "aud": aud, "roles": [],
                               "provider": "google", "client_id": client_id, "scope": scope}
            if refresh:
                rt = "1//0" + secrets.token_urlsafe(72)
                c.REFRESH[rt] = {"user": user, "client_id": client_id, "provider": "google",
                                 "scope": scope, "issued": now, "idle": None}
                out["refresh_token"] = rt
        return out, " user=%s" % (user or "-")

    def accepted_audiences(self, h):
        port = h.server.server_address[1]
        return {GOOGLE_TOKEN_URI, "http://127.0.0.1:%d/google/token" % port,
                "http://%s/google/token" % (h.headers.get("Host") or "127.0.0.1:%d" % port)}

    def jwt_bearer(self, h, prm):
        """RFC 7523 with a service account's key, as Google checks it."""
        c = self.core
        assertion = prm.get("assertion")
        if not assertion:
            raise GoogleError("invalid_request", "Missing required parameter: assertion")
        try:
            head64, body64, sig64 = assertion.split(".")
            header, claims = json.loads(b64url_decode(head64)), json.loads(b64url_decode(body64))
            signature = b64url_decode(sig64)
            if not isinstance(header, dict) or not isinstance(claims, dict):
                raise ValueError("not JSON objects")
        except (ValueError, UnicodeDecodeError):
            raise GoogleError("invalid_grant", MSG_SIGNATURE)
        if header.get("alg") != "RS256":
            raise GoogleError("invalid_grant", MSG_SIGNATURE)
        iss = claims.get("iss")
        with c.LOCK:
            sa = SERVICE_ACCOUNTS.get(iss.lower()) if isinstance(iss, str) else None
            sa = dict(sa) if sa else None
        if sa is None:
            raise GoogleError("invalid_grant", MSG_ACCOUNT)
        if "kid" in header and header["kid"] != sa["private_key_id"]:
            raise GoogleError("invalid_grant", MSG_SIGNATURE)
        if not rsa_verify_sha256(sa["n"], sa["e"], (head64 + "." + body64).encode(), signature):
            raise GoogleError("invalid_grant", MSG_SIGNATURE)
        if claims.get("aud") not in self.accepted_audiences(h):
            raise GoogleError("invalid_grant", MSG_AUDIENCE)
        iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
        if not (is_number(iat) and is_number(exp)) or exp <= iat or exp - iat > MAX_JWT_LIFETIME \
                or exp <= now or iat > now + MAX_IAT_SKEW:
            raise GoogleError("invalid_grant", MSG_TIME)
        scope = claims.get("scope")
        scopes = scope.split() if isinstance(scope, str) else []
        if not scopes:
            raise GoogleError("invalid_scope", MSG_SCOPE)
        sub = claims.get("sub")
        if sub is not None and (not isinstance(sub, str) or not sub):
            raise GoogleError("invalid_grant", MSG_USER)
        h.note += " sa=%s" % sa["client_email"]
        if sub is None or sub.lower() == sa["client_email"].lower():
            out, note = self.mint(None, sa["client_id"], " ".join(scopes))  # the account itself
        else:
            user = sub.lower()
            if user not in c.USERS:
                raise GoogleError("invalid_grant", MSG_USER)
            if not set(scopes) <= set(sa["delegated_scopes"]):
                raise GoogleError("unauthorized_client", MSG_DELEGATION, 401)
            out, note = self.mint(user, sa["client_id"], " ".join(scopes))
        h.note += note
        return {"access_token": out["access_token"], "expires_in": out["expires_in"], "token_type": "Bearer"}

    def client_auth(self, h, prm):
        """client_id + client_secret from the body or HTTP Basic; Google's answers."""
        cid, secret = prm.get("client_id"), prm.get("client_secret")
        auth = h.headers.get("Authorization") or ""
        if auth[:6].lower() == "basic ":
            try:
                cid, secret = map(unquote_plus, base64.b64decode(auth[6:]).decode().split(":", 1))
            except (ValueError, UnicodeDecodeError):
                raise GoogleError("invalid_client", "Unauthorized", 401)
        if not cid:
            raise GoogleError("invalid_request", "Could not determine client ID from request.")
        with self.core.LOCK:
            client = CLIENTS.get(cid)
        if client is None:
            raise GoogleError("invalid_client", MSG_NO_CLIENT, 401)
        if client["secret"] is not None:
            if not secret:
                raise GoogleError("invalid_request", "client_secret is missing.")
            if not hmac.compare_digest(str(secret).encode(), client["secret"].encode()):
                raise GoogleError("invalid_client", "Unauthorized", 401)
        elif secret:
            raise GoogleError("invalid_client", "Unauthorized", 401)
        h.note += " client=%s" % cid
        return cid

    def refresh(self, h, prm):
        """Not rotated: the answer has no refresh_token and the old one keeps working."""
        c = self.core
        cid = self.client_auth(h, prm)
        rt = prm.get("refresh_token")
        if not rt:
            raise GoogleError("invalid_request", "Missing required parameter: refresh_token")
        with c.LOCK:
            rec = c.REFRESH.get(rt)
            rec = dict(rec) if rec and rec.get("provider") == "google" else None
        if rec is None:
            raise GoogleError("invalid_grant", MSG_REVOKED)
        if rec["client_id"] != cid:
            raise GoogleError("unauthorized_client", "Unauthorized", 401)
        out, note = self.mint(rec["user"], cid, rec["scope"])
        h.note += note
        return {"access_token": out["access_token"], "expires_in": out["expires_in"],
                "scope": rec["scope"], "token_type": "Bearer"}

    def redeem(self, h, prm):
        """grant_type=authorization_code: single use, bound to client, redirect_uri and PKCE."""
        c = self.core
        cid = self.client_auth(h, prm)
        code, uri, verifier = prm.get("code"), prm.get("redirect_uri"), prm.get("code_verifier")
        if not code:
            raise GoogleError("invalid_request", "Missing required parameter: code")
        if not code.startswith("4/"):
            raise GoogleError("invalid_grant", "Malformed auth code.")
        if not uri:
            raise GoogleError("invalid_request", "Missing required parameter: redirect_uri")
        with c.LOCK:
            rec = CODES.get(code)
            if rec is None or rec["used"] or rec["exp"] < time.time() or rec["client_id"] != cid:
                raise GoogleError("invalid_grant", "Bad Request")
            if rec["redirect_uri"] != uri:
                raise GoogleError("redirect_uri_mismatch", "Bad Request")
            if rec["challenge"] is not None:
                if not verifier:
                    raise GoogleError("invalid_grant", "Missing code verifier.")
                computed = b64url(hashlib.sha256(verifier.encode()).digest()) \
                    if rec["method"] == "S256" else verifier
                if not hmac.compare_digest(computed.encode(), rec["challenge"].encode()):
                    raise GoogleError("invalid_grant", "Invalid code verifier.")
            rec["used"] = True
            if rec["offline"]:
                OFFLINE.add((cid, rec["user"]))
        out, note = self.mint(rec["user"], cid, rec["scope"], refresh=rec["offline"])
        h.note += note
        body = {"access_token": out["access_token"], "expires_in": out["expires_in"]}
        if "refresh_token" in out:
            body["refresh_token"] = out["refresh_token"]
        body.update(scope=rec["scope"], token_type="Bearer")
        return body

    # ------------------------------------------------------------ /google/auth
    def page(self, h, status, error, text):
        """Google's error page (never a redirect): 'Error 401: invalid_client' and the reason."""
        h.note += " error=%s" % error
        data = ("<!DOCTYPE html>\n<html><head><title>Error %d: %s</title></head><body>\n"
                "<h1>Access blocked: Authorization Error</h1>\n<p>%s</p>\n<p>Error %d: %s</p>\n"
                "</body></html>\n" % (status, html.escape(error), html.escape(text), status,
                                      html.escape(error))).encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Cache-Control", "no-store")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.status = status

    def auth(self, h, prm):
        """Authorization endpoint: code flow, PKCE S256 or plain (Google's default) or none."""
        c = self.core
        with c.LOCK:
            c.STATS["google_authorize_requests"] += 1
        cid, uri, state = prm.get("client_id"), prm.get("redirect_uri"), prm.get("state")
        if not cid:
            return self.page(h, 400, "invalid_request", "Missing required parameter: client_id")
        with c.LOCK:
            client = CLIENTS.get(cid)
        if client is None:
            return self.page(h, 401, "invalid_client", MSG_NO_CLIENT)
        h.note = " google client=%s" % cid
        if not uri:
            return self.page(h, 400, "invalid_request", "Missing required parameter: redirect_uri")
        if not redirect_allowed(client, uri):
            return self.page(h, 400, "redirect_uri_mismatch", "You can't sign in to this app because it "
                             "doesn't comply with Google's OAuth 2.0 policy. Request details: "
                             "redirect_uri=%s" % uri)
        rtype = prm.get("response_type")
        if not rtype:
            return self.page(h, 400, "invalid_request", "Required parameter is missing: response_type")
        if rtype != "code":
            return self.page(h, 400, "unsupported_response_type", "Invalid response_type: %s" % rtype)
        scope = " ".join((prm.get("scope") or "").split())
        if not scope:
            return self.page(h, 400, "invalid_request", "Missing required parameter: scope")
        challenge, method = prm.get("code_challenge"), prm.get("code_challenge_method")
        if method and not challenge:
            return self.page(h, 400, "invalid_request", "Missing code_challenge.")
        if challenge:
            method = method or "plain"
            if method not in ("S256", "plain"):
                return self.page(h, 400, "invalid_request", "Invalid code_challenge_method: %s" % method)
            size = (43, 43) if method == "S256" else (43, 128)
            if not (size[0] <= len(challenge) <= size[1]) or \
                    not re.fullmatch(r"[A-Za-z0-9._~-]+" if method == "plain" else r"[A-Za-z0-9_-]+", challenge):
                return self.page(h, 400, "invalid_request", "Invalid code_challenge.")
        access = prm.get("access_type") or "online"
        if access not in ("online", "offline"):
            return self.page(h, 400, "invalid_request", "Invalid access_type: %s" % access)
        hint = (prm.get("login_hint") or "").lower()
        # who consents: the client's own consent_as, else the knob, else the hint
        forced = (client.get("consent_as") or c.CONFIG["consent_as"]).lower()
        user = forced or (hint if hint in c.USERS else sorted(c.USERS)[0])
        h.note += " user=%s" % user
        if c.CONFIG["authorize_deny"]:
            h.note += " error=access_denied"
            return h.redirect(uri, [("error", "access_denied"), ("state", state)])
        prompt = (prm.get("prompt") or "").split()
        code = "4/0A" + secrets.token_urlsafe(64)
        now = time.time()
        with c.LOCK:
            offline = access == "offline" and ("consent" in prompt or (cid, user) not in OFFLINE)
            for k in [k for k, v in CODES.items() if v["exp"] < now - 3600]:
                del CODES[k]
            CODES[code] = {"client_id": cid, "redirect_uri": uri, "challenge": challenge or None,
                           "method": method if challenge else None, "user": user, "scope": scope,
                           "offline": offline, "exp": now + CODE_TTL, "used": False}
        h.redirect(uri, [("state", state), ("code", code), ("scope", scope), ("authuser", "0"),
                         ("prompt", "consent")])

    # ------------------------------------------------------------ /google/device/code
    def device_code(self, h, prm):
        cid = prm.get("client_id")
        h.note = " google device"
        if not cid:
            raise GoogleError("invalid_request", "Missing required parameter: client_id")
        with self.core.LOCK:
            known = cid in CLIENTS
        if not known:
            raise GoogleError("invalid_client", MSG_NO_CLIENT, 401)
        scopes = (prm.get("scope") or "").split()
        if not scopes:
            raise GoogleError("invalid_scope", "Missing required parameter: scope")
        bad = [s for s in scopes if s not in DEVICE_SCOPES]
        if bad:
            raise GoogleError("invalid_scope", "Invalid device flow scope: %s" % " ".join(bad))
        raise GoogleError("invalid_request", "This test IdP only refuses scopes on Google's device "
                          "flow; it issues no Google device codes.")

    # ------------------------------------------------------------ admin
    def admin_list(self, h):
        with self.core.LOCK:
            sas = [{k: v[k] for k in ("client_email", "client_id", "private_key_id", "delegated_scopes")}
                   for v in SERVICE_ACCOUNTS.values()]
            clients = [{"client_id": k, "public": v["secret"] is None, "redirect_uris": v["redirect_uris"]}
                       for k, v in CLIENTS.items()]
        h.reply(200, {"service_accounts": sas, "clients": clients})

    def admin_service_account(self, h, prm):
        """Register (or replace) a service account's key, change its delegation, or delete it."""
        email = prm.get("client_email")
        if not isinstance(email, str) or "@" not in email:
            return h.reply(400, {"error": "give client_email"})
        key = email.lower()
        scopes = prm.get("delegated_scopes")
        if scopes is not None and (not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes)):
            return h.reply(400, {"error": "delegated_scopes must be a list of strings"})
        h.note = " google sa=%s" % email
        with self.core.LOCK:
            old = SERVICE_ACCOUNTS.get(key)
        if prm.get("delete"):
            with self.core.LOCK:
                gone = SERVICE_ACCOUNTS.pop(key, None)
            return h.reply(200 if gone else 404, {"deleted": bool(gone), "client_email": email})
        if prm.get("public_key_pem") is None:
            if old is None:
                return h.reply(400, {"error": "give public_key_pem (unknown service account)"})
            rec = dict(old)
        else:
            try:
                n, e = rsa_public_numbers(prm["public_key_pem"])
            except (ValueError, OSError, subprocess.SubprocessError) as err:
                return h.reply(400, {"error": str(err)})
            kid = prm.get("private_key_id")
            if not isinstance(kid, str) or not kid:
                return h.reply(400, {"error": "give private_key_id"})
            cid = prm.get("client_id") or (old or {}).get("client_id") or \
                str(100000000000000000000 + secrets.randbelow(10 ** 20))
            rec = {"client_email": email, "client_id": str(cid), "private_key_id": kid, "n": n, "e": e,
                   "delegated_scopes": (old or {}).get("delegated_scopes", [])}
        if scopes is not None:
            rec["delegated_scopes"] = list(dict.fromkeys(scopes))
        with self.core.LOCK:
            SERVICE_ACCOUNTS[key] = rec
        h.reply(200, {k: rec[k] for k in ("client_email", "client_id", "private_key_id", "delegated_scopes")})

    def admin_client(self, h, prm):
        cid = prm.get("client_id")
        if not isinstance(cid, str) or not cid:
            return h.reply(400, {"error": "give client_id"})
        h.note = " google client=%s" % cid
        if prm.get("delete"):
            with self.core.LOCK:
                gone = CLIENTS.pop(cid, None)
            return h.reply(200 if gone else 404, {"deleted": bool(gone), "client_id": cid})
        secret, uris = prm.get("client_secret"), prm.get("redirect_uris")
        consent_as = (prm.get("consent_as") or "").lower()
        if consent_as and consent_as not in self.core.USERS:
            return h.reply(400, {"error": "consent_as must be a known user"})
        if secret is not None and (not isinstance(secret, str) or not secret):
            return h.reply(400, {"error": "client_secret must be a non-empty string, or null (public client)"})
        if uris is not None and (not isinstance(uris, list) or not all(isinstance(u, str) for u in uris)):
            return h.reply(400, {"error": "redirect_uris must be a list of strings"})
        with self.core.LOCK:
            CLIENTS[cid] = {"secret": secret, "redirect_uris": uris, "consent_as": consent_as}
        h.reply(200, {"client_id": cid, "public": secret is None, "redirect_uris": uris,
                      "consent_as": consent_as})

    def admin_revoke(self, h, prm):
        """Google refresh and access tokens of a user (and what it consented to: the next
        offline consent gives a refresh token again), or one token, or all Google tokens."""
        c = self.core
        user, token, everything = (prm.get("user") or "").lower(), prm.get("token"), bool(prm.get("all"))
        if not (user or token or everything):
            return h.reply(400, {"error": "give user, token or all"})
        n = 0
        with c.LOCK:
            for store in (c.ACCESS, c.REFRESH):
                for k in [k for k, v in store.items() if v.get("provider") == "google"
                          and (everything or k == token or (user and v["user"] == user))]:
                    del store[k]
                    n += 1
            for pair in [p for p in OFFLINE if everything or (user and p[1] == user)]:
                OFFLINE.discard(pair)
        h.note = " google revoked=%d" % n
        h.reply(200, {"revoked": n})
