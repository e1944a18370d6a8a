#!/usr/bin/env python3
"""Self-test of idp.py's Google endpoints (idp_google.py), of its consumers tenant and of the
consent_as knob (python3 stdlib + the openssl command). Needs no upstream: it starts its own
idp.py on a free loopback port and stops it at the end (~3 s).

  python3 tests/upstream/idp_google_selftest.py [--only jwt-ok,refresh,...] [-v]

It makes service account files with google_sa.py, signs its JWTs itself (openssl dgst
-sha256 -sign) and prints one PASS/FAIL line per check; the exit status is 1 if any failed.

  sa-file           google_sa.py make: mode 0600, Google's fields in Google's order, PKCS#8 key
  jwt-ok            JWT bearer with sub: {"access_token":"ya29...","expires_in":3599,
                    "token_type":"Bearer"} only; introspects active for the user with
                    ?for=dovecot-user, inactive with ?for=dovecot-app; aud
                    https://oauth2.googleapis.com/token is accepted too
  jwt-signature     signed by another key, a changed payload, a wrong kid, alg HS256:
                    400 invalid_grant "Invalid JWT Signature."
  jwt-unknown-sub   400 invalid_grant "Invalid email or User ID"
  jwt-no-delegation 401 unauthorized_client "Client is unauthorized ..."; also for a scope
                    outside the delegated ones; delegation granted later at run time works
  jwt-times         expired, longer than 3600 s, iat 120 s ahead: 400 invalid_grant "Invalid
                    JWT: Token must be a short-lived token ..."
  jwt-iss-aud       unknown iss: "Invalid grant: account not found"; wrong aud: "Invalid JWT:
                    Failed audience check."; no scope: invalid_scope
  jwt-no-sub        a token for the service account itself: Dovecot refuses it for users and apps
  jwt-stats         google_jwt_requests and google_jwt_subs count (also 20 concurrent
                    requests), /admin/stats/reset clears them; Entra's counters untouched
  knobs             token_fail_count gives a Google-shaped 503, access_ttl sets expires_in
  code-flow         /google/auth + authorization_code with PKCE S256: redirect with state,
                    code, scope; refresh_token only with access_type=offline on first consent
                    or with prompt=consent; code reuse, redirect_uri and verifier errors
  auth-errors       unknown client: 401 page "Error 401: invalid_client", no redirect;
                    redirect_uri not registered: 400 page; authorize_deny: error=access_denied
  refresh           not rotated (no refresh_token, the same one works again); wrong client
                    secret 401; an Entra refresh token is refused here and a Google one at Entra
  revoke            /admin/google/revoke {"user"}: "Token has been expired or revoked.", the
                    access token is dead; the next offline consent gives a refresh token again
  consent-as        config consent_as: /google/auth and Entra's /authorize consent as that user
  device            /google/device/code with https://mail.google.com/: invalid_scope
                    "Invalid device flow scope: https://mail.google.com/"
  consumers         tenant consumers: password and client_credentials refused (AADSTS9001023),
                    test-client-orgonly refused (AADSTS700016, "not enabled for consumers") on
                    token, devicecode and authorize, but fine on /common; device code flow and
                    refresh rotation work there and the token introspects as the user's
"""

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
USERS = "alice@example.test:alice-password bob@example.test:bob-password"
MAIL = "https://mail.google.com/"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MSG_SIGNATURE = "Invalid JWT Signature."
MSG_TIME = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
            "timeframe. Check your iat and exp values in the JWT claim.")
MSG_DELEGATION = ("Client is unauthorized to retrieve access tokens using this method, or client "
                  "not authorized for any of the scopes requested.")
CONSUMERS_CLIENT = ("AADSTS700016: The client does not exist or is not enabled for consumers. If you "
                    "are the application developer, configure a new application through the App "
                    "Registrations in the Azure Portal at https://go.microsoft.com/fwlink/?linkid=2083908.")
CONSUMERS_GRANT = ("AADSTS9001023: The grant type is not supported over the /common or /consumers "
                   "endpoints. Please use the /organizations or tenant-specific endpoint.")
SA_KEYS = ["type", "project_id", "private_key_id", "private_key", "client_email", "client_id",
           "auth_uri", "token_uri", "auth_provider_x509_cert_url", "client_x509_cert_url",
           "universe_domain"]

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


RAW = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)


class Ctx:
    url = None
    tmp = None
    sa = None        # delegated service account (dict from its file)
    sa_key = None    # its private key file
    nodeleg = None
    nodeleg_key = None
    verbose = False


C = Ctx()


# ------------------------------------------------------------------ helpers
def http(method, path, form=None, body=None, headers=None, opener=RAW):
    """(status, headers, parsed JSON or text)."""
    data = None
    hdrs = dict(headers or {})
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    req = urllib.request.Request(C.url + path, data=data, headers=hdrs, method=method)
    try:
        resp = opener.open(req, timeout=30)
        status, rh, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, rh, raw = e.code, e.headers, e.read()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    if C.verbose:
        print("    %s %s -> %d %s" % (method, path, status, str(parsed)[:300]))
    return status, rh, parsed


def post(path, form):
    s, _, b = http("POST", path, form=form)
    return s, b


def admin(path, body):
    s, _, b = http("POST", path, body=body)
    if s != 200:
        raise AssertionError("%s %s -> %d %r" % (path, body, s, b))
    return b


def stats():
    return http("GET", "/admin/stats")[2]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key_file, data):
    out = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_file], input=data,
                         capture_output=True, timeout=30, check=True)
    return out.stdout


def jwt(sa, key_file, claims=None, header=None, drop=(), tamper=None):
    """A JWT like Google's client libraries make for a service account (kid = private_key_id)."""
    now = int(time.time())
    c = {"iss": sa["client_email"], "scope": MAIL, "aud": C.url + "/google/token",
         "iat": now, "exp": now + 3600}
    c.update(claims or {})
    for k in drop:
        c.pop(k, None)
    h = {"alg": "RS256", "typ": "JWT", "kid": sa["private_key_id"]}
    h.update(header or {})
    h = {k: v for k, v in h.items() if v is not None}
    signing_input = b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(c).encode())
    sig = sign(key_file, signing_input.encode())
    if tamper:
        signing_input = b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(dict(c, **tamper)).encode())
    return signing_input + "." + b64url(sig)


def jwt_grant(assertion):
    return post("/google/token", {"grant_type": JWT_GRANT, "assertion": assertion})


def introspect(token, purpose):
    return post("/introspect?for=" + purpose, {"token": token})[1]


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_error(got, status, error, description=None):
    s, b = got
    expect(s == status and isinstance(b, dict) and b.get("error") == error and
           (description is None or b.get("error_description") == description),
           "wanted %d %s %r, got %d %r" % (status, error, description, s, b))


def google_sa(*args):
    out = subprocess.run([sys.executable, os.path.join(HERE, "google_sa.py"), *args],
                         capture_output=True, timeout=120)
    if out.returncode:
        raise AssertionError("google_sa.py %s: %s" % (args[0], out.stderr.decode()))
    return json.loads(out.stdout)


def load_sa(path):
    with open(path) as f:
        info = json.load(f)
    key = path + ".key.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(info["private_key"])
    return info, key


def pkce():
    verifier = b64url(secrets.token_bytes(32))
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


GCLIENT, GSECRET, GREDIRECT = "1234567890-test.apps.googleusercontent.com", "GOCSPX-test-secret", \
    "http://127.0.0.1:1/callback"


def authorize(extra=None, client=GCLIENT, redirect=GREDIRECT):
    """GET /google/auth; returns (status, location query dict or page text, verifier)."""
    verifier, challenge = pkce()
    prm = {"client_id": client, "redirect_uri": redirect, "response_type": "code", "scope": MAIL,
           "code_challenge": challenge, "code_challenge_method": "S256", "state": "st-1",
           "access_type": "offline", "login_hint": "bob@example.test"}
    prm.update(extra or {})
    prm = {k: v for k, v in prm.items() if v is not None}
    s, h, b = http("GET", "/google/auth?" + urllib.parse.urlencode(prm))
    loc = h.get("Location")
    if loc:
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(loc).query))
        q["_location"] = loc
        return s, q, verifier
    return s, b, verifier


def redeem(code, verifier, redirect=GREDIRECT, secret=GSECRET):
    return post("/google/token", {"grant_type": "authorization_code", "code": code,
                                  "code_verifier": verifier, "redirect_uri": redirect,
                                  "client_id": GCLIENT, "client_secret": secret})


def config(**kv):
    return admin("/admin/config", kv)


# ------------------------------------------------------------------ checks
def check_sa_file():
    path = os.path.join(C.tmp, "sa.json")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    expect(mode == 0o600, "mode %o" % mode)
    with open(path) as f:
        text = f.read()
    info = json.loads(text)
    expect(list(info) == SA_KEYS, "keys %s" % list(info))
    expect(info["type"] == "service_account" and info["project_id"] == "oxb-test", "type/project %r" % info)
    expect(info["private_key"].startswith("-----BEGIN PRIVATE KEY-----\n") and
           info["private_key"].endswith("-----END PRIVATE KEY-----\n"), "not PKCS#8 PEM")
    expect("\\n" in text, "private_key not JSON-escaped with \\n")
    expect(len(info["private_key_id"]) == 40 and len(info["client_id"]) == 21 and info["client_id"].isdigit(),
           "ids %r %r" % (info["private_key_id"], info["client_id"]))
    expect(info["token_uri"] == C.url + "/google/token", "token_uri")
    expect(info["client_x509_cert_url"].endswith("/sa-mail%40oxb-test.iam.gserviceaccount.com"), "x509 url")
    expect(info["universe_domain"] == "googleapis.com", "universe_domain")
    listed = http("GET", "/admin/google")[2]
    emails = {a["client_email"]: a for a in listed["service_accounts"]}
    expect(emails[C.sa["client_email"]]["delegated_scopes"] == [MAIL], "registered delegation %r" % listed)
    expect(emails[C.nodeleg["client_email"]]["delegated_scopes"] == [], "no delegation %r" % listed)


def check_jwt_ok():
    s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
    expect(s == 200, "status %d %r" % (s, b))
    expect(sorted(b) == ["access_token", "expires_in", "token_type"], "keys %s" % sorted(b))
    expect(b["access_token"].startswith("ya29.") and b["expires_in"] == 3599 and b["token_type"] == "Bearer",
           "body %r" % b)
    i = introspect(b["access_token"], "dovecot-user")
    expect(i.get("active") is True and i.get("username") == "alice@example.test", "introspect %r" % i)
    expect(introspect(b["access_token"], "dovecot-app") == {"active": False}, "app passdb accepted it")
    s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "Bob@Example.test", "aud": "https://oauth2.googleapis.com/token"}))
    expect(s == 200, "aud oauth2.googleapis.com refused: %d %r" % (s, b))
    i = introspect(b["access_token"], "dovecot-user")
    expect(i.get("active") is True and i.get("username") == "bob@example.test", "introspect bob %r" % i)
    s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}, header={"kid": None}))
    expect(s == 200, "no kid refused: %d %r" % (s, b))


def check_jwt_signature():
    alice = {"sub": "alice@example.test"}
    # signed with the other account's key, under this account's name (and kid)
    expect_error(jwt_grant(jwt(C.sa, C.nodeleg_key, alice)), 400, "invalid_grant", MSG_SIGNATURE)
    # signed for alice, payload changed to bob afterwards
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, alice, tamper={"sub": "bob@example.test"})),
                 400, "invalid_grant", MSG_SIGNATURE)
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, alice, header={"kid": "0" * 40})), 400, "invalid_grant",
                 MSG_SIGNATURE)
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, alice, header={"alg": "HS256"})), 400, "invalid_grant",
                 MSG_SIGNATURE)
    good = jwt(C.sa, C.sa_key, alice)
    head, body, sig = good.split(".")
    flipped = bytearray(base64.urlsafe_b64decode(sig + "=="))
    flipped[-1] ^= 1
    expect_error(jwt_grant("%s.%s.%s" % (head, body, b64url(bytes(flipped)))), 400, "invalid_grant",
                 MSG_SIGNATURE)


def check_jwt_unknown_sub():
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, {"sub": "carol@example.test"})), 400, "invalid_grant",
                 "Invalid email or User ID")


def check_jwt_no_delegation():
    expect_error(jwt_grant(jwt(C.nodeleg, C.nodeleg_key, {"sub": "alice@example.test"})), 401,
                 "unauthorized_client", MSG_DELEGATION)
    extra = MAIL + " https://www.googleapis.com/auth/gmail.send"
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test", "scope": extra})), 401,
                 "unauthorized_client", MSG_DELEGATION)
    admin("/admin/google/service-account", {"client_email": C.nodeleg["client_email"],
                                            "delegated_scopes": [MAIL]})
    try:
        s, b = jwt_grant(jwt(C.nodeleg, C.nodeleg_key, {"sub": "alice@example.test"}))
        expect(s == 200, "delegation granted later: %d %r" % (s, b))
    finally:
        admin("/admin/google/service-account", {"client_email": C.nodeleg["client_email"],
                                                "delegated_scopes": []})


def check_jwt_times():
    now = int(time.time())
    for claims in ({"iat": now - 7200, "exp": now - 3600},      # expired
                   {"iat": now - 10, "exp": now + 3600},         # lives 3610 s
                   {"iat": now + 120, "exp": now + 1800},        # issued 2 minutes ahead
                   {"iat": now, "exp": now}):                    # exp not after iat
        claims["sub"] = "alice@example.test"
        expect_error(jwt_grant(jwt(C.sa, C.sa_key, claims)), 400, "invalid_grant", MSG_TIME)
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}, drop=("iat",))),
                 400, "invalid_grant", MSG_TIME)
    s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test", "iat": now + 30, "exp": now + 1800}))
    expect(s == 200, "iat 30 s ahead refused: %d %r" % (s, b))


def check_jwt_iss_aud():
    stranger = dict(C.sa, client_email="stranger@oxb-test.iam.gserviceaccount.com")
    expect_error(jwt_grant(jwt(stranger, C.sa_key, {"sub": "alice@example.test"})), 400, "invalid_grant",
                 "Invalid grant: account not found")
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test",
                                                "aud": "https://accounts.google.com/o/oauth2/token"})),
                 400, "invalid_grant", "Invalid JWT: Failed audience check.")
    expect_error(jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}, drop=("scope",))),
                 400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    expect_error(post("/google/token", {"grant_type": JWT_GRANT}), 400, "invalid_request")
    expect_error(post("/google/token", {"grant_type": "password"}), 400, "unsupported_grant_type",
                 "Invalid grant_type: password")


def check_jwt_no_sub():
    for sa, key in ((C.sa, C.sa_key), (C.nodeleg, C.nodeleg_key)):
        s, b = jwt_grant(jwt(sa, key))
        expect(s == 200 and sorted(b) == ["access_token", "expires_in", "token_type"],
               "no sub: %d %r" % (s, b))
        for purpose in ("dovecot-user", "dovecot-app"):
            expect(introspect(b["access_token"], purpose) == {"active": False},
                   "the service account's own token is active for %s" % purpose)


def check_jwt_stats():
    admin("/admin/stats/reset", {})
    st = stats()
    expect(st["google_jwt_requests"] == 0 and st["google_jwt_subs"] == {}, "after reset %r" % st)
    jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
    jwt_grant(jwt(C.sa, C.sa_key, {"sub": "carol@example.test"}))  # refused, still counted
    jwt_grant(jwt(C.sa, C.sa_key))
    assertions = [jwt(C.sa, C.sa_key, {"sub": "bob@example.test"}) for _ in range(20)]
    results = []
    threads = [threading.Thread(target=lambda a=a: results.append(jwt_grant(a)[0])) for a in assertions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect(results.count(200) == 20, "concurrent results %r" % results)
    st = stats()
    want = {"alice@example.test": 1, "carol@example.test": 1, "bob@example.test": 20,
            C.sa["client_email"]: 1}
    expect(st["google_jwt_requests"] == 23 and st["google_jwt_subs"] == want, "stats %r" % st)
    expect(st["google_token_requests"] == 23 and st["google_grant_requests"] == {"jwt_bearer": 23},
           "google token stats %r" % st)
    expect(st["token_requests"] == 0 and st["grant_requests"] == {}, "Entra counters moved: %r" % st)
    admin("/admin/stats/reset", {})
    st = stats()
    expect(st["google_jwt_requests"] == 0 and st["google_jwt_subs"] == {} and
           st["google_token_requests"] == 0, "reset %r" % st)


def check_knobs():
    config(token_fail_count=1)
    try:
        got = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
        expect_error(got, 503, "temporarily_unavailable", "injected failure (token_fail_count).")
        expect(sorted(got[1]) == ["error", "error_description"], "not Google-shaped: %r" % (got[1],))
        s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
        expect(s == 200, "after the injected failure: %d %r" % (s, b))
        config(access_ttl=120)
        s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
        expect(s == 200 and b["expires_in"] == 119, "access_ttl 120: %r" % b)
        exp = introspect(b["access_token"], "dovecot-user")["exp"]
        expect(abs(exp - (time.time() + 120)) < 5, "exp %r" % exp)
        config(access_ttl=0)
        s, b = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))
        expect(s == 200 and introspect(b["access_token"], "dovecot-user") == {"active": False},
               "access_ttl 0 still active")
    finally:
        config(token_fail_count=0, access_ttl=3600)


def check_code_flow():
    s, q, verifier = authorize({"login_hint": "alice@example.test", "prompt": "consent"})
    expect(s == 302 and q.get("state") == "st-1" and q.get("scope") == MAIL and q.get("code", "").startswith("4/"),
           "redirect %d %r" % (s, q))
    expect(q["_location"].startswith(GREDIRECT + "?state=st-1&code="), "location %s" % q["_location"])
    expect_error(redeem(q["code"], verifier, redirect=GREDIRECT + "x"), 400, "redirect_uri_mismatch", "Bad Request")
    expect_error(redeem(q["code"], "x" * 43), 400, "invalid_grant", "Invalid code verifier.")
    expect_error(redeem(q["code"], ""), 400, "invalid_grant", "Missing code verifier.")
    expect_error(redeem(q["code"], verifier, secret="wrong"), 401, "invalid_client", "Unauthorized")
    s, b = redeem(q["code"], verifier)
    expect(s == 200 and sorted(b) == ["access_token", "expires_in", "refresh_token", "scope", "token_type"]
           and b["scope"] == MAIL and b["expires_in"] == 3599 and b["refresh_token"].startswith("1//"),
           "redeem %d %r" % (s, b))
    i = introspect(b["access_token"], "dovecot-user")
    expect(i.get("active") is True and i.get("username") == "alice@example.test", "introspect %r" % i)
    expect_error(redeem(q["code"], verifier), 400, "invalid_grant", "Bad Request")
    expect_error(redeem("garbage", verifier), 400, "invalid_grant", "Malformed auth code.")
    # second offline consent without prompt=consent: no new refresh token (Google's rule)
    s, q, verifier = authorize({"login_hint": "alice@example.test"})
    s, b = redeem(q["code"], verifier)
    expect(s == 200 and "refresh_token" not in b, "second consent gave a refresh token: %r" % b)
    # online access: none either, even with prompt=consent
    s, q, verifier = authorize({"login_hint": "alice@example.test", "access_type": None, "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    expect(s == 200 and "refresh_token" not in b, "online access gave a refresh token: %r" % b)
    # prompt=consent: a refresh token again
    s, q, verifier = authorize({"login_hint": "alice@example.test", "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    expect(s == 200 and "refresh_token" in b, "prompt=consent gave no refresh token: %r" % b)
    # an unknown login_hint: the first user
    s, q, verifier = authorize({"login_hint": "nobody@example.test", "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    expect(introspect(b["access_token"], "dovecot-user").get("username") == "alice@example.test",
           "unknown hint did not give the first user")


def check_auth_errors():
    s, body, _ = authorize(client="nobody.apps.googleusercontent.com")
    expect(s == 401 and isinstance(body, str) and "Error 401: invalid_client" in body
           and "The OAuth client was not found." in body, "unknown client: %d %r" % (s, body))
    s, body, _ = authorize(redirect="https://evil.example/cb")
    expect(s == 400 and isinstance(body, str) and "Error 400: redirect_uri_mismatch" in body,
           "unregistered redirect_uri: %d %r" % (s, body))
    s, q, _ = authorize(redirect="http://127.0.0.1:4567/callback")  # loopback: any port
    expect(s == 302 and "code" in q, "loopback port: %d %r" % (s, q))
    config(authorize_deny=True)
    try:
        s, q, _ = authorize()
        expect(s == 302 and q.get("error") == "access_denied" and q.get("state") == "st-1" and "code" not in q,
               "authorize_deny: %d %r" % (s, q))
    finally:
        config(authorize_deny=False)


def check_refresh():
    s, q, verifier = authorize({"login_hint": "bob@example.test", "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    rt = b["refresh_token"]
    for _ in range(2):  # the same refresh token, twice: not rotated
        s, r = post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt,
                                      "client_id": GCLIENT, "client_secret": GSECRET})
        expect(s == 200 and sorted(r) == ["access_token", "expires_in", "scope", "token_type"]
               and r["scope"] == MAIL and r["expires_in"] == 3599, "refresh %d %r" % (s, r))
        i = introspect(r["access_token"], "dovecot-user")
        expect(i.get("active") is True and i.get("username") == "bob@example.test", "introspect %r" % i)
    basic = base64.b64encode(("%s:%s" % (GCLIENT, GSECRET)).encode()).decode()
    s, _, r = http("POST", "/google/token", form={"grant_type": "refresh_token", "refresh_token": rt},
                   headers={"Authorization": "Basic " + basic})
    expect(s == 200, "HTTP Basic client auth: %d %r" % (s, r))
    expect_error(post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt,
                                        "client_id": GCLIENT, "client_secret": "wrong"}),
                 401, "invalid_client", "Unauthorized")
    expect_error(post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt,
                                        "client_id": "nobody.apps.googleusercontent.com", "client_secret": "x"}),
                 401, "invalid_client", "The OAuth client was not found.")
    expect_error(post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt, "client_id": GCLIENT}),
                 400, "invalid_request", "client_secret is missing.")
    # Entra's refresh token here, and Google's at Entra's endpoint (which must not eat it)
    s, e = post("/common/oauth2/v2.0/token", {"grant_type": "password", "client_id": "test-client",
                                              "username": "bob@example.test", "password": "bob-password"})
    expect_error(post("/google/token", {"grant_type": "refresh_token", "refresh_token": e["refresh_token"],
                                        "client_id": GCLIENT, "client_secret": GSECRET}),
                 400, "invalid_grant", "Token has been expired or revoked.")
    s, e = post("/common/oauth2/v2.0/token", {"grant_type": "refresh_token", "client_id": "test-client",
                                              "refresh_token": rt})
    expect(s == 400 and e.get("error") == "invalid_grant", "Entra took Google's refresh token: %d %r" % (s, e))
    s, r = post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt,
                                  "client_id": GCLIENT, "client_secret": GSECRET})
    expect(s == 200, "Google's refresh token died at Entra's endpoint: %d %r" % (s, r))


def check_revoke():
    s, q, verifier = authorize({"login_hint": "bob@example.test", "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    rt, at = b["refresh_token"], b["access_token"]
    alice_at = jwt_grant(jwt(C.sa, C.sa_key, {"sub": "alice@example.test"}))[1]["access_token"]
    n = admin("/admin/google/revoke", {"user": "Bob@example.test"})["revoked"]
    expect(n >= 2, "revoked %d" % n)
    expect_error(post("/google/token", {"grant_type": "refresh_token", "refresh_token": rt,
                                        "client_id": GCLIENT, "client_secret": GSECRET}),
                 400, "invalid_grant", "Token has been expired or revoked.")
    expect(introspect(at, "dovecot-user") == {"active": False}, "revoked access token still active")
    expect(introspect(alice_at, "dovecot-user").get("active") is True, "alice's token was revoked too")
    s, q, verifier = authorize({"login_hint": "bob@example.test"})  # no prompt=consent
    s, b = redeem(q["code"], verifier)
    expect("refresh_token" in b, "no refresh token on the first consent after revocation: %r" % b)
    s, _, r = http("POST", "/admin/google/revoke", body={})
    expect(s == 400, "revoke without arguments: %d" % s)


def check_consent_as():
    config(consent_as="bob@example.test")
    try:
        s, q, verifier = authorize({"login_hint": "alice@example.test", "prompt": "consent"})
        s, b = redeem(q["code"], verifier)
        expect(introspect(b["access_token"], "dovecot-user").get("username") == "bob@example.test",
               "Google consent_as ignored")
        verifier, challenge = pkce()
        prm = {"client_id": "test-client", "redirect_uri": "http://localhost/cb", "response_type": "code",
               "scope": "openid", "code_challenge": challenge, "code_challenge_method": "S256",
               "login_hint": "alice@example.test"}
        s, h, _ = http("GET", "/common/oauth2/v2.0/authorize?" + urllib.parse.urlencode(prm))
        code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h["Location"]).query))["code"]
        s, b = post("/common/oauth2/v2.0/token", {"grant_type": "authorization_code", "client_id": "test-client",
                                                  "code": code, "redirect_uri": "http://localhost/cb",
                                                  "code_verifier": verifier})
        expect(s == 200 and introspect(b["access_token"], "dovecot-user").get("username") == "bob@example.test",
               "Entra consent_as ignored: %d %r" % (s, b))
        s, _, r = http("POST", "/admin/config", body={"consent_as": "carol@example.test"})
        expect(s == 400, "unknown consent_as accepted: %d %r" % (s, r))
    finally:
        config(consent_as="")
    config(consent_as="bob@example.test")
    expect(config(consent_as=None)["consent_as"] == "", "consent_as null did not turn it off")
    s, q, verifier = authorize({"login_hint": "alice@example.test", "prompt": "consent"})
    s, b = redeem(q["code"], verifier)
    expect(introspect(b["access_token"], "dovecot-user").get("username") == "alice@example.test",
           "consent_as not reset")


def check_device():
    expect_error(post("/google/device/code", {"client_id": GCLIENT, "scope": MAIL}), 400, "invalid_scope",
                 "Invalid device flow scope: https://mail.google.com/")
    expect_error(post("/google/device/code", {"client_id": "nobody", "scope": MAIL}), 401, "invalid_client",
                 "The OAuth client was not found.")


def check_consumers():
    t = "/consumers/oauth2/v2.0/token"
    expect_error(post(t, {"grant_type": "client_credentials", "client_id": "test-app",
                          "client_secret": "test-app-secret", "scope": "https://outlook.office365.com/.default"}),
                 400, "invalid_request", CONSUMERS_GRANT)
    expect_error(post(t, {"grant_type": "password", "client_id": "test-client", "username": "alice@example.test",
                          "password": "alice-password"}), 400, "invalid_request", CONSUMERS_GRANT)
    s, b = post("/common/oauth2/v2.0/token", {"grant_type": "password", "client_id": "test-client-orgonly",
                                              "username": "alice@example.test", "password": "alice-password"})
    expect(s == 200 and "refresh_token" in b, "org-only client on /common: %d %r" % (s, b))
    expect_error(post(t, {"grant_type": "refresh_token", "client_id": "test-client-orgonly",
                          "refresh_token": b["refresh_token"]}), 400, "unauthorized_client", CONSUMERS_CLIENT)
    expect_error(post("/consumers/oauth2/v2.0/devicecode", {"client_id": "test-client-orgonly", "scope": "x"}),
                 400, "unauthorized_client", CONSUMERS_CLIENT)
    verifier, challenge = pkce()
    s, h, r = http("GET", "/consumers/oauth2/v2.0/authorize?" + urllib.parse.urlencode(
        {"client_id": "test-client-orgonly", "redirect_uri": "http://localhost/cb", "response_type": "code",
         "scope": "x", "code_challenge": challenge, "code_challenge_method": "S256"}))
    expect(s == 400 and not h.get("Location") and r.get("error_description") == CONSUMERS_CLIENT,
           "authorize org-only on consumers: %d %r" % (s, r))
    # delegated grants work on consumers: device code, then rotation of the refresh token
    s, d = post("/consumers/oauth2/v2.0/devicecode", {"client_id": "test-client", "scope": "x",
                                                      "login_hint": "bob@example.test"})
    expect(s == 200, "devicecode %d %r" % (s, d))
    admin("/admin/device/approve", {"user_code": d["user_code"]})
    s, b = post(t, {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": "test-client",
                    "device_code": d["device_code"]})
    expect(s == 200 and "refresh_token" in b, "device grant on consumers: %d %r" % (s, b))
    i = introspect(b["access_token"], "dovecot-user")
    expect(i.get("active") is True and i.get("username") == "bob@example.test", "introspect %r" % i)
    s, b2 = post(t, {"grant_type": "refresh_token", "client_id": "test-client", "refresh_token": b["refresh_token"]})
    expect(s == 200 and b2["refresh_token"] != b["refresh_token"], "refresh on consumers: %d %r" % (s, b2))
    s, b3 = post(t, {"grant_type": "refresh_token", "client_id": "test-client", "refresh_token": b["refresh_token"]})
    expect(s == 400 and b3.get("error") == "invalid_grant", "old refresh token still works: %d %r" % (s, b3))


CHECKS = [("sa-file", check_sa_file), ("jwt-ok", check_jwt_ok), ("jwt-signature", check_jwt_signature),
          ("jwt-unknown-sub", check_jwt_unknown_sub), ("jwt-no-delegation", check_jwt_no_delegation),
          ("jwt-times", check_jwt_times), ("jwt-iss-aud", check_jwt_iss_aud), ("jwt-no-sub", check_jwt_no_sub),
          ("jwt-stats", check_jwt_stats), ("knobs", check_knobs), ("code-flow", check_code_flow),
          ("auth-errors", check_auth_errors), ("refresh", check_refresh), ("revoke", check_revoke),
          ("consent-as", check_consent_as), ("device", check_device), ("consumers", check_consumers)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated check names")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every request")
    a = ap.parse_args()
    C.verbose = a.verbose
    names = [n for n, _ in CHECKS]
    only = a.only.split(",") if a.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        sys.exit("unknown checks: %s (known: %s)" % (",".join(unknown), ",".join(names)))
    C.tmp = tempfile.mkdtemp(prefix="idp-google-selftest.")
    port = free_port()
    C.url = "http://127.0.0.1:%d" % port
    log = open(os.path.join(C.tmp, "idp.log"), "w")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    idp = subprocess.Popen([sys.executable, os.path.join(HERE, "idp.py"), "--port", str(port), "--users", USERS],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    failed = 0
    try:
        deadline = time.time() + 15
        while True:
            try:
                if http("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if idp.poll() is not None or time.time() > deadline:
                sys.exit("idp.py did not start; its log:\n" + open(log.name).read())
            time.sleep(0.05)
        admin("/admin/google/client", {"client_id": GCLIENT, "client_secret": GSECRET,
                                       "redirect_uris": [GREDIRECT, "http://localhost/cb"]})
        sa = os.path.join(C.tmp, "sa.json")
        google_sa("make", "--email", "sa-mail@oxb-test.iam.gserviceaccount.com", "--token-uri",
                  C.url + "/google/token", "--out", sa, "--register", C.url)
        C.sa, C.sa_key = load_sa(sa)
        nd = os.path.join(C.tmp, "sa-nodeleg.json")
        google_sa("make", "--email", "sa-nodeleg@oxb-test.iam.gserviceaccount.com", "--token-uri",
                  C.url + "/google/token", "--out", nd, "--register", C.url, "--no-delegation")
        C.nodeleg, C.nodeleg_key = load_sa(nd)
        for name, fn in CHECKS:
            if name not in only:
                continue
            t0 = time.time()
            try:
                fn()
                print("PASS %-18s (%.2f s)" % (name, time.time() - t0))
            except Exception as e:  # one line per failed check, then go on
                failed += 1
                print("FAIL %-18s %s: %s" % (name, type(e).__name__, e))
            sys.stdout.flush()
    finally:
        idp.terminate()
        try:
            idp.wait(10)
        except subprocess.TimeoutExpired:
            idp.kill()
        log.close()
        if failed and a.verbose:
            print(open(log.name).read())
        shutil.rmtree(C.tmp, ignore_errors=True)
    print("%d of %d checks failed" % (failed, len(only)) if failed else "all %d checks passed" % len(only))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
