#!/usr/bin/env python3
"""Google service account files for the test IdP (python3 stdlib + the openssl command).

  google_sa.py make --email sa@proj.iam.gserviceaccount.com --token-uri URL --out FILE.json
                    [--register IDP_URL] [--no-delegation | --delegate SCOPE ...]
  google_sa.py register FILE.json --idp IDP_URL [--no-delegation | --delegate SCOPE ...]

make: a new RSA-2048 key (openssl genpkey) and a service account key file in the format of the
file Google Cloud gives for a key ("type": "service_account", "private_key" PKCS#8 PEM, ...),
written with mode 0600. --token-uri is the file's token_uri, e.g.
http://127.0.0.1:28080/google/token. --register (or the register command) registers the
account's public key with the test IdP (POST IDP_URL/admin/google/service-account), with
domain-wide delegation for https://mail.google.com/ unless --no-delegation (no delegation at
all) or --delegate SCOPE (repeatable: exactly those scopes).

Prints one JSON line: {"file", "client_email", "client_id", "private_key_id", "registered",
"delegated_scopes"} ("delegated_scopes" only when registered).
"""

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

MAIL_SCOPE = "https://mail.google.com/"


def openssl(*args, data=None):
    out = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)
    if out.returncode:
        sys.exit("openssl %s failed: %s" % (args[0], out.stderr.decode("utf-8", "replace").strip()))
    return out.stdout


def public_key_pem(private_key_pem):
    return openssl("pkey", "-pubout", data=private_key_pem.encode()).decode()


def make_file(email, token_uri, path):
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        sys.exit("--email: not an email address: %r" % email)
    key = openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048").decode()
    if not key.startswith("-----BEGIN PRIVATE KEY-----"):
        sys.exit("openssl genpkey did not give a PKCS#8 key")
    domain = email.split("@", 1)[1]
    project = domain.split(".", 1)[0] if domain.endswith(".iam.gserviceaccount.com") else "test-project"
    info = {  # the fields and order of a key file from Google Cloud
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": key,
        "client_email": email,
        "client_id": str(100000000000000000000 + secrets.randbelow(10 ** 20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/" + quote(email, safe=""),
        "universe_domain": "googleapis.com",
    }
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return info


def register(info, idp_url, scopes):
    body = json.dumps({"client_email": info["client_email"], "client_id": info["client_id"],
                       "private_key_id": info["private_key_id"],
                       "public_key_pem": public_key_pem(info["private_key"]),
                       "delegated_scopes": scopes}).encode()
    req = urllib.request.Request(idp_url.rstrip("/") + "/admin/google/service-account", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        sys.exit("registering with %s failed: HTTP %d %s" % (idp_url, e.code, e.read()[:300]))


def main():
    ap = argparse.ArgumentParser(description="Google service account files for the test IdP")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="a new key and service account file")
    mk.add_argument("--email", required=True, help="client_email, e.g. sa@proj.iam.gserviceaccount.com")
    mk.add_argument("--token-uri", required=True, help="token_uri, e.g. http://127.0.0.1:28080/google/token")
    mk.add_argument("--out", required=True, help="the file to write (mode 0600)")
    mk.add_argument("--register", metavar="IDP_URL", help="also register it, e.g. http://127.0.0.1:28080")
    rg = sub.add_parser("register", help="register an existing file's account with the IdP")
    rg.add_argument("file")
    rg.add_argument("--idp", required=True, metavar="IDP_URL")
    for p in (mk, rg):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--no-delegation", action="store_true", help="no domain-wide delegation")
        g.add_argument("--delegate", action="append", metavar="SCOPE",
                       help="delegated scope (repeatable; default https://mail.google.com/)")
    a = ap.parse_args()
    scopes = [] if a.no_delegation else (a.delegate or [MAIL_SCOPE])
    if a.cmd == "make":
        info, path, idp = make_file(a.email, a.token_uri, a.out), a.out, a.register
    else:
        with open(a.file) as f:
            info = json.load(f)
        if info.get("type") != "service_account":
            sys.exit("%s: not a service account file" % a.file)
        path, idp = a.file, a.idp
    out = {"file": os.path.abspath(path), "client_email": info["client_email"],
           "client_id": info["client_id"], "private_key_id": info["private_key_id"], "registered": False}
    if idp:
        reg = register(info, idp, scopes)
        out.update(registered=True, delegated_scopes=reg["delegated_scopes"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
