#!/usr/bin/env python3
"""oxbridge benchmark: direct XOAUTH2 vs oxbridge vs emailproxy.

Called by bench/run once the test upstream is up and the binaries are built
(see README.md). Starts oxbridge, emailproxy and fakeup on loopback, runs the
workloads with bench-driver, writes OUT/results.json and prints the table
(report.py). Every process it starts is stopped by its own handle at the end.
"""
import argparse
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import report  # noqa: E402

PASSWORD = "bench-password"  # the local password devices give oxbridge and emailproxy
USERS = ["alice@example.test", "bob@example.test"]  # mailboxes of the test upstream
SCOPE = "https://outlook.office365.com/.default"
MiB = 1 << 20

# loopback ports of the processes this script starts: below the kernel's
# ephemeral range (32768-60999), so that no client connection holds one
PORTS = {
    "oxb_real": {"imap": 31143, "pop3": 31110, "smtp": 31025},
    "ep_real": {"imap": 31243, "pop3": 31210, "smtp": 31225},
    "ep_fake": {"imap": 31343, "pop3": 31310, "smtp": 31325},
    "fake": {"imap": 31993, "pop3": 31995, "smtp": 31587, "http": 31080},
    "oxb_fake": {"imap": 31443, "pop3": 31410, "smtp": 31425},
    "oxb_scale": 31543,  # and up, one per process
    "oxb_tokens": 31643,
}

no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def http(url, data=None, timeout=10):
    body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else data
    with no_proxy.open(url, data=body, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port, proc, what, secs=30):
    t = time.time() + secs
    while time.time() < t:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see its log")
        if port_open(port):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {secs}s")


class Procs:
    """Processes started here, stopped by their own handles."""

    def __init__(self, out):
        self.out = out
        self.procs = {}

    def start(self, name, argv, env=None, wait_ports=(), nofile=None):
        logf = open(os.path.join(self.out, f"{name}.log"), "ab")
        e = dict(os.environ)
        e.update(env or {})

        def pre():
            os.setsid()
            if nofile:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        argv = [str(a) for a in argv]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=e,
                             preexec_fn=pre)
        self.procs[name] = p
        for port in wait_ports:
            wait_port(port, p, name)
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def driver(args, cmd, *extra, timeout=900):
    argv = [args.driver, cmd, *map(str, extra)]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=sys.stderr, timeout=timeout)
    if r.returncode != 0:
        return {"failed": f"bench-driver {cmd} exited {r.returncode}"}
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def toml_str(s):
    return json.dumps(str(s))


def oxbridge_config(path, state, upstream, ca, token_url, listeners, accounts, log_level="warn"):
    lines = [
        f"state_dir = {toml_str(state)}",
        "[log]",
        f'level = "{log_level}"',
        "[upstream]",
        f"smtp = {toml_str(upstream['smtp'])}",
        f"imap = {toml_str(upstream['imap'])}",
        f"pop3 = {toml_str(upstream['pop3'])}",
        f"ca_file = {toml_str(ca)}",
        "[oauth]",
        'tenant = "common"',
        'client_id = "test-app"',
        'client_secret = "test-app-secret"',
        f"token_url = {toml_str(token_url)}",
    ]
    for proto, port in listeners:
        lines += [
            "[[listener]]",
            f'protocol = "{proto}"',
            f'listen = "127.0.0.1:{port}"',
            'tls = "none"',
            "allow_plaintext_auth = true",
            "max_connections = 60000",
        ]
    for acc in accounts:
        lines.append("[[account]]")
        lines += [f"{k} = {toml_str(v)}" for k, v in acc.items()]
    # Defaults protect Exchange (3 SMTP / 20 IMAP / 20 POP3 sessions per
    # mailbox, 2000 connections); the direct path has no such limits, so the
    # benchmark lifts them.
    lines += [
        "[limits]",
        "max_connections = 60000",
        "smtp_sessions_per_mailbox = 1000",
        "imap_sessions_per_mailbox = 60000",
        "pop3_sessions_per_mailbox = 1000",
        "mailbox_queue = 1000",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def emailproxy_config(path, servers, accounts):
    out = []
    for proto, local, host, port in servers:
        sec = {"imap": "IMAP", "pop3": "POP", "smtp": "SMTP"}[proto]
        out += [f"[{sec}-{local}]", f"server_address = {host}", f"server_port = {port}",
                "local_address = 127.0.0.1"]
        if proto == "smtp":
            out.append("server_starttls = True")
        out.append("")
    for user, token_url in accounts:
        out += [f"[{user}]", f"token_url = {token_url}", f"oauth2_scope = {SCOPE}",
                "oauth2_flow = client_credentials", "client_id = test-app",
                "client_secret = test-app-secret", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    u = os.uname()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kib / 1048576, 1), "loadavg_start": load,
            "kernel": f"{u.sysname} {u.release}", "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def make_fake_tls(out):
    """An ECDSA P-256 CA and server certificate for fakeup (cheap handshakes:
    the upstream's signing cost is not oxbridge's)."""
    d = os.path.join(out, "fake-tls")
    os.makedirs(d, exist_ok=True)
    run = lambda *a: subprocess.run(a, cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-days", "30", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=fakeup bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-extfile", "server.ext", "-out", "server.crt")
    return {k: os.path.join(d, f) for k, f in [("ca", "ca.crt"), ("cert", "server.crt"), ("key", "server.key")]}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True, help="state dir of the test upstream (upstream.json)")
    ap.add_argument("--oxbridge", required=True)
    ap.add_argument("--driver", required=True)
    ap.add_argument("--fakeup", required=True)
    ap.add_argument("--emailproxy", help="emailproxy executable (omit to skip that path)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="small counts, for trying the script out")
    ap.add_argument("--only", default="login,bulk,fastlogin,fastbulk,scale,argon2,tokens")
    ap.add_argument("--sessions", type=int, default=10000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(","))
    q = args.quick
    N = {
        "seq": 10 if q else 30, "conc": 50, "total": 50 if q else 100, "login_timeout": 15,
        "imap_size": 10 * MiB, "smtp_size": 25_000_000,
        "rounds": 1 if q else 3, "bulk_rounds": 1 if q else 4,
        "reps_fetch": 3 if q else 20, "reps_data": 2 if q else 8,
        "fast_reps_fetch": 5 if q else 50, "fast_reps_data": 3 if q else 20, "ep_fast_reps": 2 if q else 6,
        "sessions": min(args.sessions, 1000) if q else args.sessions,
        "token_logins": 200 if q else 1000, "token_accounts": 10, "argon2_accounts": 8 if q else 20,
    }
    up = json.load(open(os.path.join(args.upstream, "upstream.json")))
    res = {"machine": machine(), "params": N, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "oxbridge_commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()}
    for name, ports in PORTS.items():
        for p in (ports.values() if isinstance(ports, dict) else [ports]):
            if port_open(p):
                raise SystemExit(f"port {p} ({name}) is already in use: another benchmark running?")

    procs = Procs(args.out)
    try:
        run_all(args, up, res, N, only, procs)
    finally:
        procs.stop_all()
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        with open("/proc/loadavg") as f:
            res["machine"]["loadavg_end"] = " ".join(f.read().split()[:3])
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
    text = report.render(res)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(text)
    print(text)


def run_all(args, up, res, N, only, procs):
    out = args.out
    ca = up["UPSTREAM_CA"]
    token_url = up["TOKEN_URL"]
    idp = up["IDP_URL"]
    real = {"imap": int(up["IMAPS_PORT"]), "pop3": int(up["POP3S_PORT"]), "smtp": int(up["SUBMISSION_PORT"])}

    phc = subprocess.run([args.oxbridge, "hash-password"], input=PASSWORD.encode(), capture_output=True,
                         check=True).stdout.decode().strip()

    # direct tokens (what a client that speaks XOAUTH2 would hold)
    tok = http(token_url, {"grant_type": "client_credentials", "client_id": "test-app",
                           "client_secret": "test-app-secret", "scope": SCOPE})["access_token"]
    real_token = os.path.join(out, "direct-token")
    with open(real_token, "w") as f:
        f.write(tok)

    # the 10 MiB message for FETCH/RETR, in alice's INBOX
    r = driver(args, "append", "--proto", "imap", "--mode", "direct", "--addr", f"127.0.0.1:{real['imap']}",
               "--ca", ca, "--token-file", real_token, "--users", USERS[0], "--size", N["imap_size"])
    if "failed" in r:
        raise SystemExit("could not APPEND the bulk message to the test upstream")

    # fakeup
    ftls = make_fake_tls(out)
    fk = PORTS["fake"]
    fake = procs.start("fakeup", [args.fakeup, "--imaps", fk["imap"], "--pop3s", fk["pop3"], "--smtp", fk["smtp"],
                                  "--http", fk["http"], "--cert", ftls["cert"], "--key", ftls["key"],
                                  "--msg-size", N["imap_size"], "--users", 100],
                       wait_ports=fk.values(), nofile=1 << 20)
    fake_url = f"http://127.0.0.1:{fk['http']}"
    fake_token_url = f"{fake_url}/common/oauth2/v2.0/token"
    ftok = http(fake_token_url, {"grant_type": "client_credentials", "client_id": "test-app",
                                 "client_secret": "test-app-secret", "scope": SCOPE})["access_token"]
    fake_token = os.path.join(out, "fake-direct-token")
    with open(fake_token, "w") as f:
        f.write(ftok)
    upstream_real = {p: f"localhost:{real[p]}" for p in real}
    upstream_fake = {p: f"localhost:{fk[p]}" for p in ("imap", "pop3", "smtp")}
    cc_accounts = lambda users: [{"login": u, "password_hash": phc, "grant": "client_credentials"} for u in users]

    # oxbridge against the real upstream
    oxr = PORTS["oxb_real"]
    oxcfg = os.path.join(out, "oxbridge-real.toml")
    oxbridge_config(oxcfg, os.path.join(out, "state-real"), upstream_real, ca, token_url,
                    list(oxr.items()), cc_accounts(USERS))
    oxb = procs.start("oxbridge-real", [args.oxbridge, "run", "--config", oxcfg], wait_ports=oxr.values())

    # emailproxy, against both upstreams (the fake one as user0, whose token comes from fakeup)
    ep = None
    if args.emailproxy:
        bundle = os.path.join(out, "ca-bundle.pem")
        with open(bundle, "w") as f:
            f.write(open(ca).read() + open(ftls["ca"]).read())
        epcfg = os.path.join(out, "emailproxy.config")
        servers = [(p, PORTS["ep_real"][p], "127.0.0.1", real[p]) for p in ("imap", "pop3", "smtp")]
        servers += [(p, PORTS["ep_fake"][p], "127.0.0.1", fk[p]) for p in ("imap", "pop3", "smtp")]
        emailproxy_config(epcfg, servers, [(u, token_url) for u in USERS] + [("user0@example.test", fake_token_url)])
        ep = procs.start("emailproxy", [args.emailproxy, "--no-gui", "--config-file", epcfg,
                                        "--log-file", os.path.join(out, "emailproxy-own.log")],
                         env={"SSL_CERT_FILE": bundle, "no_proxy": "*", "NO_PROXY": "*"},
                         wait_ports=list(PORTS["ep_real"].values()) + list(PORTS["ep_fake"].values()))

    paths = {
        "direct": lambda p: ["--mode", "direct", "--addr", f"127.0.0.1:{real[p]}", "--ca", ca,
                             "--token-file", real_token],
        "oxbridge": lambda p: ["--mode", "plain", "--addr", f"127.0.0.1:{oxr[p]}"],
    }
    pids = {"direct": None, "oxbridge": oxb.pid}
    if ep:
        paths["emailproxy"] = lambda p: ["--mode", "plain", "--addr", f"127.0.0.1:{PORTS['ep_real'][p]}"]
        pids["emailproxy"] = ep.pid
    users = ",".join(f"{u}:{PASSWORD}" for u in USERS)

    # ---------------------------------------------------------------- login
    def login_runs(paths, pids, users, stats_reset, stats_read, key):
        """Each protocol: a warm-up per path, then `rounds` rounds in which the
        paths take turns (so a noisy neighbour hits them alike). emailproxy,
        whose logins take a third of a second each, runs one round of the full
        counts; the others run each round with a share of the sequential
        logins and a full batch of concurrent ones."""
        out = {}
        rounds = N["rounds"]
        for proto in ("imap", "pop3", "smtp"):
            for path, spec in paths.items():
                w = driver(args, "login", "--proto", proto, *spec(proto), "--users", users,
                           "--warm", 2, "--seq", 0, "--total", 0)
                out.setdefault(path, {})[proto] = {"runs": [], "warm_errors": w.get("warm_errors", w.get("failed"))}
            for r in range(rounds):
                for path, spec in paths.items():
                    slow = path == "emailproxy"
                    if slow and r > 0:
                        continue
                    seq = N["seq"] if slow else -(-N["seq"] // rounds)
                    log(f"{key} {proto} {path} round {r + 1}: {seq} sequential, {N['total']} at {N['conc']}-way")
                    stats_reset()
                    x = driver(args, "login", "--proto", proto, *spec(proto), "--users", users, "--warm", 0,
                               "--pid", pids.get(path) or 0, "--seq", seq, "--conc", N["conc"],
                               "--total", N["total"], "--timeout", N["login_timeout"])
                    x["token_requests"] = stats_read()
                    out[path][proto]["runs"].append(x)
        return out

    if "login" in only:
        res["login"] = login_runs(paths, pids, users, lambda: http(f"{idp}/admin/stats/reset", b"{}"),
                                  lambda: http(f"{idp}/admin/stats")["token_requests"], "login")

    # ---------------------------------------------------------------- bulk
    def bulk_runs(paths, pids, user, sizes, key):
        """Each protocol: the paths take turns, `rounds` times, each turn
        moving a share of the repetitions."""
        out = {}
        for proto in ("imap", "pop3", "smtp"):
            for r in range(N["bulk_rounds"]):
                for path, spec in paths.items():
                    size, reps = sizes(path, proto)
                    reps = -(-reps // N["bulk_rounds"])
                    log(f"{key} {proto} {path} round {r + 1}: {reps} x {size} bytes")
                    x = driver(args, "bulk", "--proto", proto, *spec(proto), "--users", user,
                               "--pid", pids.get(path) or 0, "--size", size, "--reps", reps,
                               "--from", user.split(":")[0], "--rcpt", "sink@discard.invalid")
                    out.setdefault(path, {}).setdefault(proto, {"runs": []})["runs"].append(x)
        return out

    if "bulk" in only:
        res["bulk"] = bulk_runs(paths, pids, users.split(",")[0],
                                lambda path, proto: (N["smtp_size"], N["reps_data"]) if proto == "smtp"
                                else (N["imap_size"], N["reps_fetch"]), "bulk")

    # ---------------------------------------------------------------- the in-memory upstream
    if "fastbulk" in only or "fastlogin" in only:
        oxf = PORTS["oxb_fake"]
        fcfg = os.path.join(out, "oxbridge-fake.toml")
        oxbridge_config(fcfg, os.path.join(out, "state-fake"), upstream_fake, ftls["ca"], fake_token_url,
                        list(oxf.items()), cc_accounts(["user0@example.test", "user1@example.test"]))
        oxbf = procs.start("oxbridge-fake", [args.oxbridge, "run", "--config", fcfg], wait_ports=oxf.values())
        fpaths = {
            "direct": lambda p: ["--mode", "direct", "--addr", f"127.0.0.1:{fk[p]}", "--ca", ftls["ca"],
                                 "--token-file", fake_token],
            "oxbridge": lambda p: ["--mode", "plain", "--addr", f"127.0.0.1:{oxf[p]}"],
        }
        fpids = {"oxbridge": oxbf.pid}
        if "fastlogin" in only:
            fusers = ",".join(f"user{i}@example.test:{PASSWORD}" for i in range(2))
            res["fastlogin"] = login_runs(fpaths, fpids, fusers, lambda: http(f"{fake_url}/stats/reset", b""),
                                          lambda: http(f"{fake_url}/stats")["token_requests"], "fastlogin")
        if "fastbulk" in only:
            if ep:  # emailproxy's own ceiling, with fewer repetitions (it is slow)
                fpaths["emailproxy"] = lambda p: ["--mode", "plain", "--addr",
                                                  f"127.0.0.1:{PORTS['ep_fake'][p]}"]
                fpids["emailproxy"] = ep.pid

            def fsizes(path, proto):
                size = N["smtp_size"] if proto == "smtp" else N["imap_size"]
                if path == "emailproxy":
                    return size, N["ep_fast_reps"]
                return size, N["fast_reps_data"] if proto == "smtp" else N["fast_reps_fetch"]

            res["fastbulk"] = bulk_runs(fpaths, fpids, f"user0@example.test:{PASSWORD}", fsizes, "fastbulk")
        procs.stop("oxbridge-fake")

    if ep:  # emailproxy is done: free the CPU
        procs.stop("emailproxy")
    procs.stop("oxbridge-real")

    # ---------------------------------------------------------------- scale
    if "scale" in only:
        n = N["sessions"]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        # each relayed session holds two sockets in oxbridge; keep 200 spare
        k = 1
        while 2 * math.ceil(n / k) + 200 > hard:
            k += 1
        # password-grant accounts: no Argon2 in this process, whose freed
        # memory would otherwise be reused by the sessions and hide their cost
        accts = [f"user{i}@example.test" for i in range(10)]
        creds = ",".join(f"{u}:{u.split('@')[0]}-password" for u in accts)
        addrs, spids, fresh = [], [], []
        for i in range(k):
            port = PORTS["oxb_scale"] + i
            cfg = os.path.join(out, f"oxbridge-scale{i}.toml")
            oxbridge_config(cfg, os.path.join(out, f"state-scale{i}"), upstream_fake, ftls["ca"], fake_token_url,
                            [("imap", port)], [{"login": "*@example.test", "grant": "password"}])
            p = procs.start(f"oxbridge-scale{i}", [args.oxbridge, "run", "--config", cfg], wait_ports=[port],
                            nofile=1 << 20)
            addrs.append(f"127.0.0.1:{port}")
            spids.append(p.pid)
            fresh.append(rss_kib(p.pid))
            # warm: one login per account (token cache), then the baseline
            driver(args, "login", "--proto", "imap", "--mode", "plain", "--addr", addrs[-1],
                   "--users", creds, "--warm", 1, "--seq", 0, "--total", 0)
        log(f"scale: {n} IMAP sessions through {k} oxbridge process(es) (fd hard limit {hard})")
        time.sleep(1)
        r = driver(args, "scale", "--addrs", ",".join(addrs), "--pids", ",".join(map(str, spids)),
                   "--users", creds, "--sessions", n, "--conc", 500, "--timeout", 60)
        r["fd_hard_limit"] = hard
        r["rss_fresh_kib"] = sum(fresh)
        r["fakeup_stats"] = http(f"{fake_url}/stats")
        res["scale"] = r
        for i in range(k):
            procs.stop(f"oxbridge-scale{i}")

    # ---------------------------------------------------------------- memory after Argon2 checks
    if "argon2" in only:
        # Resident memory of a fresh oxbridge as distinct accounts log in for
        # the first time (each first login runs one Argon2id verification,
        # m = 19 MiB); later logins are served by the verified-password cache.
        port = PORTS["oxb_tokens"] + 1
        n = N["argon2_accounts"]
        accts = [f"user{i}@example.test" for i in range(n)]
        cfg = os.path.join(out, "oxbridge-argon2.toml")
        oxbridge_config(cfg, os.path.join(out, "state-argon2"), upstream_fake, ftls["ca"], fake_token_url,
                        [("imap", port)], cc_accounts(accts))
        p = procs.start("oxbridge-argon2", [args.oxbridge, "run", "--config", cfg], wait_ports=[port])
        rss = [rss_kib(p.pid)]
        for u in accts:
            driver(args, "login", "--proto", "imap", "--mode", "plain", "--addr", f"127.0.0.1:{port}",
                   "--users", f"{u}:{PASSWORD}", "--warm", 1, "--seq", 0, "--total", 0)
            rss.append(rss_kib(p.pid))
        again = driver(args, "login", "--proto", "imap", "--mode", "plain", "--addr", f"127.0.0.1:{port}",
                       "--users", ",".join(f"{u}:{PASSWORD}" for u in accts), "--warm", 0, "--seq", 2 * n,
                       "--total", 0)
        res["argon2"] = {"accounts": n, "rss_kib": rss, "rss_after_repeats_kib": rss_kib(p.pid),
                         "repeat_p50_ms": report.pct(again.get("seq", {}).get("lat_ms", []), 50)}
        procs.stop("oxbridge-argon2")

    # ---------------------------------------------------------------- token endpoint load
    if "tokens" in only:
        port = PORTS["oxb_tokens"]
        cfg = os.path.join(out, "oxbridge-tokens.toml")
        oxbridge_config(cfg, os.path.join(out, "state-tokens"), upstream_fake, ftls["ca"], fake_token_url,
                        [("imap", port)], [{"login": "*@example.test", "grant": "password"}])
        procs.start("oxbridge-tokens", [args.oxbridge, "run", "--config", cfg], wait_ports=[port])
        http(f"{fake_url}/stats/reset", b"")
        accts = ",".join(f"user{i}@example.test:user{i}-password" for i in range(N["token_accounts"]))
        log(f"tokens: {N['token_logins']} IMAP logins over {N['token_accounts']} password-grant accounts, cold cache")
        r = driver(args, "login", "--proto", "imap", "--mode", "plain", "--addr", f"127.0.0.1:{port}",
                   "--users", accts, "--warm", 0, "--seq", 0, "--conc", 50, "--total", N["token_logins"])
        st = http(f"{fake_url}/stats")
        res["tokens"] = {"logins": N["token_logins"], "accounts": N["token_accounts"],
                         "ok": len(r.get("conc", {}).get("lat_ms", [])), "errors": r.get("conc", {}).get("errors"),
                         "error_samples": r.get("conc", {}).get("error_samples"),
                         "token_requests": st["token_requests"], "grant_requests": st["grant_requests"],
                         "wall_s": r.get("conc", {}).get("wall_s")}
        procs.stop("oxbridge-tokens")
    procs.stop("fakeup")


if __name__ == "__main__":
    main()
