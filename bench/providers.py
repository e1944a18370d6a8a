"""The providers workload: a Microsoft and a Google account side by side.

One fresh oxbridge process on the real upstream (Dovecot, Postfix, the test
IdP) holds, for each mailbox (alice, bob), two accounts:

* Microsoft: `grant = "client_credentials"` under `[oauth]` (login = the
  mailbox); one app-only token from the IdP's Entra endpoint serves every
  mailbox;
* Google: `grant = "client_credentials"` with `provider = "school"`, a
  `[[provider]]` of kind google with a service account key file made by
  tests/upstream/google_sa.py (logins alice@school.test, bob@school.test,
  `mailbox` = alice/bob@example.test); for each mailbox oxbridge signs a JWT
  (RS256) and exchanges it at the IdP's /google/token: one token per mailbox.

Paths, as in the login workload: direct (XOAUTH2 with a token the bench
holds: the Entra app token, or a Google token of alice's that the bench gets
with a JWT of its own service account, signed by the openssl command),
oxbridge, and emailproxy: one process per provider (emailproxy keys an
account by the device's user name, which is the mailbox, so one process
cannot hold a Microsoft and a Google account for the same mailbox); its
Google accounts use its `oauth2_flow = service_account` (google-auth, in
bench/.venv), with a service account of their own.

1. First logins: each account's first IMAP login through the fresh process
   (cold caches: Argon2 check, token request, upstream login), alice then bob,
   Microsoft first for alice and Google first for bob; for oxbridge, the token request's time from
   its /metrics (oxbridge_token_request_duration_seconds, before and after).
2. Warm logins, per protocol: a warm-up login per account and path, then
   `prov_rounds` rounds in which the providers and paths take turns
   (sequential logins, then a batch at 50-way concurrency); emailproxy, a
   third of a second per login, runs a few sequential logins in the first
   round only.
3. Token requests: the IdP's counters read before and after every login
   run: Entra's `token_requests` and Google's `google_token_requests` (the
   phases never overlap, so each delta belongs to one provider and path),
   and Google's `google_jwt_pairs` ("ISS SUB"), which give each path's
   requests per mailbox since every path has a service account of its own.
"""
import base64
import json
import os
import subprocess
import sys
import time

import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOOGLE_SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PROVIDERS = ("microsoft", "google")
PATHS = ("direct", "oxbridge", "emailproxy")
PROTOS = report.PROTOS
GOOGLE_DOMAIN = "school.test"  # the Google accounts' logins: alice@school.test for alice@example.test
TOKEN_METRIC = "oxbridge_token_request_duration_seconds"
FIRST_LOGIN_GAP_S = 0.2  # before each first login (see workload)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def service_account(idp, name, out_dir):
    """A service account key file, registered with the IdP (delegated for mail); (file, client_email)."""
    path = os.path.join(out_dir, f"sa-{name}.json")
    email = f"bench-{name}@oxb-bench.iam.gserviceaccount.com"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "upstream", "google_sa.py"), "make",
                        "--email", email, "--token-uri", f"{idp}/google/token", "--out", path, "--register", idp],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"google_sa.py make {email} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return path, email


def google_token(sa_path, mailbox, http):
    """A Google access token for `mailbox`, as a client that speaks XOAUTH2 would hold: a JWT-bearer
    grant with the service account's key (signed by the openssl command)."""
    with open(sa_path) as f:
        info = json.load(f)
    now = int(time.time())
    head = {"alg": "RS256", "typ": "JWT", "kid": info["private_key_id"]}
    claims = {"iss": info["client_email"], "sub": mailbox, "scope": GOOGLE_SCOPE, "aud": info["token_uri"],
              "iat": now, "exp": now + 3600}
    signing = b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())
    key = sa_path + ".key.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(info["private_key"])
    try:
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing.encode(),
                             capture_output=True, check=True, timeout=60).stdout
    finally:
        os.unlink(key)
    return http(info["token_uri"], {"grant_type": JWT_BEARER, "assertion": signing + "." + b64url(sig)})["access_token"]


def token_metric(lines):
    """(requests, seconds) of oxbridge's token requests from its /metrics lines (all grants)."""
    n = s = 0.0
    for ln in lines:
        name, _, val = ln.rpartition(" ")
        base = name.split("{", 1)[0]
        try:
            if base == TOKEN_METRIC + "_count":
                n += float(val)
            elif base == TOKEN_METRIC + "_sum":
                s += float(val)
        except ValueError:
            return None
    return n, s


def idp_counts(stats):
    return {"entra": stats.get("token_requests", 0), "google": stats.get("google_token_requests", 0),
            "pairs": {k.lower(): v for k, v in (stats.get("google_jwt_pairs") or {}).items()}}


def emailproxy_python(exe):
    """The interpreter of the emailproxy script (its #! line), else the one beside it."""
    try:
        with open(exe) as f:
            first = f.readline()
        if first.startswith("#!") and os.path.exists(first[2:].split()[0]):
            return first[2:].split()[0]
    except OSError:
        pass
    return os.path.join(os.path.dirname(exe), "python")


def workload(args, out, procs, N, up, phc, real, ca, real_token, ports, users, password, tools, log):
    """Run the three parts; the results for report.py (key 'providers'). `tools`: the bench's
    oxbridge_config, emailproxy_config, driver, http and metric_lines."""
    t0 = time.time()
    d = os.path.join(out, "providers")
    os.makedirs(d, exist_ok=True)
    http, driver = tools["http"], tools["driver"]
    idp, token_url = up["IDP_URL"], up["TOKEN_URL"]
    stats = lambda: idp_counts(http(f"{idp}/admin/stats"))
    google_login = lambda u: f"{u.split('@')[0]}@{GOOGLE_DOMAIN}"
    res = {"mailboxes": list(users), "google_logins": [google_login(u) for u in users],
           "seq": N["prov_seq"], "total": N["prov_total"], "conc": N["conc"], "rounds": N["prov_rounds"],
           "ep_seq": N["prov_ep_seq"], "login_timeout": N["login_timeout"], "emailproxy": {}}

    ep_google = None
    if args.emailproxy:
        py = emailproxy_python(args.emailproxy)
        chk = subprocess.run([py, "-c", "import requests, google.auth.transport.requests, "
                                        "google.oauth2.service_account"], capture_output=True, text=True)
        if chk.returncode == 0:
            ep_google = True
        else:
            res["emailproxy"]["google"] = ("n/a: google-auth and requests are not importable by emailproxy's "
                                           f"Python ({py}); bench/run installs them into bench/.venv")
    sa = {"oxbridge": service_account(idp, "oxbridge", d), "direct": service_account(idp, "direct", d)}
    if ep_google:
        sa["emailproxy"] = service_account(idp, "emailproxy", d)
    res["service_accounts"] = {k: v[1] for k, v in sa.items()}
    pairs0 = stats()["pairs"]

    # the direct path's tokens: the Entra app token the bench already holds; a Google token of alice's
    gtok = os.path.join(d, "direct-google-token")
    with open(gtok, "w") as f:
        f.write(google_token(sa["direct"][0], users[0], http))

    # oxbridge: both providers in one process
    P = ports["oxb"]
    upstream = {p: f"localhost:{real[p]}" for p in ("imap", "pop3", "smtp")}
    accounts = [{"login": u, "password_hash": phc, "grant": "client_credentials"} for u in users]
    accounts += [{"login": google_login(u), "password_hash": phc, "grant": "client_credentials",
                  "provider": "school", "mailbox": u} for u in users]
    cfg = os.path.join(out, "oxbridge-providers.toml")
    tools["oxbridge_config"](cfg, os.path.join(out, "state-providers"), upstream, ca, token_url,
                             [(p, P[p]) for p in ("imap", "pop3", "smtp")], accounts, admin=P["admin"])
    with open(cfg, "a") as f:  # the service account's token URL: its key file's token_uri
        f.write('[[provider]]\nname = "school"\nkind = "google"\n'
                f"service_account_file = {json.dumps(sa['oxbridge'][0])}\n"
                + "".join(f"{p} = {json.dumps(upstream[p])}\n" for p in ("smtp", "imap", "pop3")))
    oxb = procs.start("oxbridge-providers", [args.oxbridge, "run", "--config", cfg], wait_ports=P.values())
    metrics = lambda: token_metric(tools["metric_lines"](f"http://127.0.0.1:{P['admin']}/metrics",
                                                         (TOKEN_METRIC,)))

    # emailproxy: one process per provider
    ep = {}
    env = {"SSL_CERT_FILE": ca, "no_proxy": "*", "NO_PROXY": "*"}
    for prov in PROVIDERS:
        if not args.emailproxy or (prov == "google" and not ep_google):
            continue
        E = ports[f"ep_{prov}"]
        epcfg = os.path.join(out, f"emailproxy-providers-{prov}.config")
        servers = [(p, E[p], "127.0.0.1", real[p]) for p in ("imap", "pop3", "smtp")]
        if prov == "microsoft":
            tools["emailproxy_config"](epcfg, servers, [(u, token_url) for u in users])
        else:
            tools["emailproxy_config"](epcfg, servers, [])
            with open(epcfg, "a") as f:
                for u in users:
                    f.write(f"\n[{u}]\ntoken_url = {idp}/google/token\noauth2_scope = {GOOGLE_SCOPE}\n"
                            f"oauth2_flow = service_account\nclient_id = file\nclient_secret = {sa['emailproxy'][0]}\n")
        ep[prov] = procs.start(f"emailproxy-providers-{prov}",
                               [args.emailproxy, "--no-gui", "--config-file", epcfg, "--log-file",
                                os.path.join(out, f"emailproxy-providers-{prov}-own.log")],
                               env=env, wait_ports=E.values())
        res["emailproxy"].setdefault(prov, "ok")

    creds = lambda us: ",".join(f"{u}:{password}" for u in us)
    spec = {
        ("microsoft", "direct"): (lambda p: ["--mode", "direct", "--addr", f"127.0.0.1:{real[p]}", "--ca", ca,
                                             "--token-file", real_token], users, None),
        ("google", "direct"): (lambda p: ["--mode", "direct", "--addr", f"127.0.0.1:{real[p]}", "--ca", ca,
                                          "--token-file", gtok], users[:1], None),
        ("microsoft", "oxbridge"): (lambda p: ["--mode", "plain", "--addr", f"127.0.0.1:{P[p]}"], users, oxb.pid),
        ("google", "oxbridge"): (lambda p: ["--mode", "plain", "--addr", f"127.0.0.1:{P[p]}"],
                                 [google_login(u) for u in users], oxb.pid),
    }
    for prov, e in ep.items():
        spec[(prov, "emailproxy")] = (lambda p, prov=prov: ["--mode", "plain", "--addr",
                                                            f"127.0.0.1:{ports[f'ep_{prov}'][p]}"], users, e.pid)
    tally = {f"{prov} {path}": {"logins": 0, "entra": 0, "google": 0} for prov, path in spec}
    res["tally"] = tally
    res["users"] = {f"{prov} {path}": s[1] for (prov, path), s in spec.items()}

    def run(key, proto, us=None, warm=0, seq=0, total=0):
        argv, default_users, pid = spec[key]
        us = us or default_users
        s0 = stats()
        x = driver(args, "login", "--proto", proto, *argv(proto), "--users", creds(us), "--warm", warm,
                   "--pid", pid or 0, "--seq", seq, "--conc", N["conc"], "--total", total,
                   "--timeout", N["login_timeout"])
        s1 = stats()
        t = tally[" ".join(key)]
        t["logins"] += warm * len(us) + seq + total
        t["entra"] += s1["entra"] - s0["entra"]
        t["google"] += s1["google"] - s0["google"]
        x["token_requests"] = s1["entra" if key[0] == "microsoft" else "google"] - \
            s0["entra" if key[0] == "microsoft" else "google"]
        return x

    try:
        # 1. first logins: fresh caches, the providers taking turns
        cold = res["first_logins"] = {}
        for path in ("oxbridge", "emailproxy"):
            for i, u in enumerate(users):
                # alternate which provider goes first: the first login of the process or of a mailbox
                # may pay for what the second one then finds ready (TLS session, connections)
                for prov in (PROVIDERS if i % 2 == 0 else PROVIDERS[::-1]):
                    key = (prov, path)
                    if key not in spec:
                        continue
                    login = spec[key][1][i]
                    log(f"providers: first login {prov} {path} {login}")
                    # The test IdP (Python http.server) writes an answer's headers and its body in two
                    # segments, without TCP_NODELAY: a request on a kept-alive connection within ~20 ms
                    # of the previous answer waits ~40 ms for the client's delayed ACK (Nagle). A pause
                    # keeps that stall, which no real token endpoint has, out of the token times.
                    time.sleep(FIRST_LOGIN_GAP_S)
                    m0 = metrics() if path == "oxbridge" else None
                    x = run(key, "imap", us=[login], seq=1)
                    m1 = metrics() if path == "oxbridge" else None
                    lat = (x.get("seq") or {}).get("lat_ms") or []
                    c = {"login": login, "mailbox": u, "ms": lat[0] if lat else None,
                         "error": x.get("failed") or next(iter((x.get("seq") or {}).get("error_samples") or []), None),
                         "idp_requests": x["token_requests"]}
                    if m0 and m1:
                        c["oxb_requests"] = round(m1[0] - m0[0])
                        c["token_ms"] = round((m1[1] - m0[1]) * 1000, 3) if c["oxb_requests"] else None
                    cold.setdefault(f"{prov} {path}", []).append(c)

        # 2. warm logins
        L = res["login"] = {}
        rounds = N["prov_rounds"]
        for proto, _ in PROTOS:
            for key in spec:
                if key[1] != "emailproxy":
                    w = run(key, proto, warm=1)
                    L.setdefault(" ".join(key), {})[proto] = {
                        "runs": [], "warm_errors": w.get("warm_errors", w.get("failed"))}
            for r in range(rounds):
                for prov in PROVIDERS:
                    for path in PATHS:
                        key = (prov, path)
                        if key not in spec or (path == "emailproxy" and r > 0):
                            continue
                        if path == "emailproxy":
                            seq, total = N["prov_ep_seq"], 0
                            L.setdefault(" ".join(key), {})[proto] = {"runs": [], "warm_errors": 0}
                        else:
                            seq, total = -(-N["prov_seq"] // rounds), N["prov_total"]
                        log(f"providers {proto} {prov} {path} round {r + 1}: {seq} sequential"
                            + (f", {total} at {N['conc']}-way" if total else ""))
                        L[" ".join(key)][proto]["runs"].append(run(key, proto, seq=seq, total=total))

        # 3. token requests per mailbox (Google: per service account and mailbox)
        pairs = stats()["pairs"]
        res["google_pairs"] = {
            path: {u: pairs.get(f"{email} {u}".lower(), 0) - pairs0.get(f"{email} {u}".lower(), 0) for u in users}
            for path, email in res["service_accounts"].items()}
        res["oxbridge_token_metric"] = metrics()
    finally:
        procs.stop("oxbridge-providers")
        for prov in ep:
            procs.stop(f"emailproxy-providers-{prov}")
    res["wall_s"] = round(time.time() - t0, 1)
    log(f"providers: done in {res['wall_s']} s")
    return res


# ---------------------------------------------------------------- the table

def section(P, targets):
    """The PROVIDERS section of the table (lines), and its target."""
    f, table, login_stats = report.f, report.table, report.login_stats
    if P.get("failed"):
        return ["", f"PROVIDERS: failed: {P['failed']}"]
    mb = lambda u: u.split("@")[0]
    names = "/".join(mb(u) for u in P["mailboxes"])
    out = ["", f"PROVIDERS: one oxbridge process with, per mailbox ({names}), a Microsoft client_credentials "
               f"account ([oauth]: one app-only token serves every mailbox) and a Google service-account account "
               f"([[provider]] kind google: an RS256 JWT per mailbox, one token per mailbox); real upstream; "
               f"{P.get('wall_s')} s"]
    epn = P.get("emailproxy") or {}
    for prov, why in epn.items():
        if why != "ok":
            out.append(f"  emailproxy {prov}: {why}")

    # first logins
    out.append(f"  first login of each account (IMAP, fresh processes, cold caches: password check, token request "
               f"if any, upstream login), {names} in turn, Microsoft first for "
               f"{mb(P['mailboxes'][0])}, Google first for the next")
    rows = []
    cold = P.get("first_logins", {})
    for path in ("oxbridge", "emailproxy"):
        for prov in PROVIDERS:
            key = f"{prov} {path}"
            if key not in cold:
                if path == "emailproxy" and prov in epn:
                    rows.append([path, prov] + ["n/a"] * 4)
                continue
            cs = cold[key]
            rows.append([path, prov, ", ".join(f(c["ms"], 1) if c["ms"] is not None else "error" for c in cs),
                         ", ".join(str(c["idp_requests"]) for c in cs),
                         ", ".join(f(c["token_ms"], 2) if c.get("token_ms") is not None else "-" for c in cs)
                         if path == "oxbridge" else "n/a",
                         "; ".join(c["error"] for c in cs if c.get("error")) or "none"])
    out.append(table(["path", "provider", f"first login ms ({names})", "IdP token requests",
                      "oxbridge token request ms", "errors"], rows, ["<", "<", ">", ">", ">", "<"]))
    out.append("  oxbridge token request ms: its own time for the token request that login made (from "
               "oxbridge_token_request_duration_seconds on /metrics; Google's includes signing the JWT); "
               "'-': the login made none")

    # warm logins
    L = P.get("login", {})
    out.append("")
    out.append(f"  warm logins: {P['seq']} sequential and {P['rounds']} batch(es) of {P['total']} at "
               f"{P['conc']}-way per path, the providers and paths taking turns over {P['rounds']} round(s); "
               f"emailproxy {P['ep_seq']} sequential (once); latency = TCP connect to login OK")
    rows = []
    for proto, name in PROTOS:
        st = {k: login_stats(v[proto]) for k, v in L.items() if proto in v}
        for prov in PROVIDERS:
            d = st.get(f"{prov} direct")
            for path in PATHS:
                key = f"{prov} {path}"
                if key not in st:
                    if path == "emailproxy" and prov in epn:
                        rows.append([name, prov, path] + ["n/a"] * 14)
                    continue
                s = st[key]
                ms = st.get(f"microsoft {path}") if prov == "google" else None
                rows.append([
                    name, prov, path, f(s["p50"], 2), f(s["p99"], 2), str(s["seq_err"]),
                    f(s["cp50"], 1), f(s["cp99"], 1), f(s["rate"], 1) if s["total"] else "-",
                    f"{f(s['rate_min'], 0)}-{f(s['rate_max'], 0)}" if s["total"] else "-",
                    f"{s['ok']}/{s['total']}" if s["total"] else "-", str(s["conc_err"]),
                    f(s["cpu_ms"], 2) if path != "direct" else "-", str(s["tokens"]),
                    f"{s['p50'] - d['p50']:+.2f}" if d and path != "direct" and s["p50"] is not None
                    and d["p50"] is not None else "-",
                    report.ratio(s["rate"], d["rate"]) if d and path != "direct" and s["total"] else "-",
                    f"{s['p50'] - ms['p50']:+.2f}" if ms and s["p50"] is not None and ms["p50"] is not None
                    else "-"])
    out.append(table(["proto", "provider", "path", "seq p50 ms", "p99", "err", "conc p50 ms", "p99", "logins/s",
                      "min-max", "ok", "err", "CPU ms/login", "tok", "added p50 ms", "rate/direct",
                      "p50 vs microsoft"], rows, ["<", "<", "<"] + [">"] * 14))
    out.append(f"  direct: XOAUTH2 with a token the bench holds (Microsoft: the app token, {names}; Google: a "
               f"token of {mb(P['mailboxes'][0])}'s, so {mb(P['mailboxes'][0])} only); tok: token requests the IdP "
               f"saw during the measured logins; p50 vs microsoft: Google's seq p50 minus Microsoft's on the same "
               f"path and protocol")
    for proto, name in PROTOS:
        for key, v in L.items():
            if proto in v:
                for smp in login_stats(v[proto])["samples"][:2]:
                    out.append(f"  error seen ({name} {key}): {smp}")

    # token requests over the whole workload
    out.append("")
    out.append("  token requests at the IdP over the whole workload (first logins, warm-ups, measured logins):")
    rows = []
    gp = P.get("google_pairs", {})
    verdict = {}
    for path in ("oxbridge", "emailproxy"):
        for prov in PROVIDERS:
            key = f"{prov} {path}"
            t = P["tally"].get(key)
            if not t:
                if path == "emailproxy" and prov in epn:
                    rows.append([path, prov] + ["n/a"] * 4)
                continue
            us = P["users"][key]
            per = -(-t["logins"] // len(us))
            if prov == "google":
                pairs = gp.get(path, {})
                permb = ", ".join(f"{mb(u)} {pairs.get(u, 0)}" for u in P["mailboxes"])
                expect = f"{len(P['mailboxes'])} (one per mailbox)"
                n = t["google"]
            else:
                permb = "n/a (app-only token: no mailbox in the request)"
                expect = "1 (one app token)" if path == "oxbridge" else f"{len(us)} (one per account)"
                n = t["entra"]
            verdict[key] = (n, pairs if prov == "google" else None)
            rows.append([path, prov, f"{t['logins']} ({per} per mailbox)", str(n), permb, expect])
    out.append(table(["path", "provider", "logins", "IdP token requests", "per mailbox", "expected"], rows,
                     ["<", "<", ">", ">", "<", "<"]))
    out.append("  Microsoft: Entra's token endpoint (token_requests); Google: /google/token (google_token_requests), "
               "per mailbox from google_jwt_pairs of the path's own service account; direct holds its tokens "
               "(fetched before its logins)")

    # the target: one token request per mailbox (Google), one app token (Microsoft), no errors
    g, m = verdict.get("google oxbridge"), verdict.get("microsoft oxbridge")
    if g and m:
        errs = sum(login_stats(v[p])["seq_err"] + login_stats(v[p])["conc_err"]
                   for k, v in L.items() if k.endswith(" oxbridge") for p, _ in PROTOS if p in v)
        errs += sum(1 for k, cs in cold.items() if k.endswith(" oxbridge") for c in cs if c.get("error"))
        ok = (g[0] == len(P["mailboxes"]) and all(g[1].get(u) == 1 for u in P["mailboxes"]) and m[0] == 1
              and errs == 0)
        tl = P["tally"]
        targets.append(("token requests (providers): one per mailbox for a Google service account, one app token "
                        "for Microsoft, in one process", ok,
                        f"Google {g[0]} for {tl['google oxbridge']['logins']} logins ("
                        + ", ".join(f"{mb(u)} {g[1].get(u, 0)}" for u in P["mailboxes"])
                        + f"), Microsoft {m[0]} for {tl['microsoft oxbridge']['logins']} logins; {errs} errors"))
    return out
