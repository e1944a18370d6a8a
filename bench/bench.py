#!/usr/bin/env python3
"""oxbridge benchmark: direct XOAUTH2 vs oxbridge vs emailproxy.

Called by bench/run once the test upstream is up and the binaries are built
(see README.md). Starts oxbridge, emailproxy and fakeup on loopback, runs the
workloads with bench-driver, writes OUT/results.json and prints the table
(report.py). Every process it starts is stopped by its own handle at the end.
"""
import argparse
import asyncio
import base64
import datetime
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import busy  # noqa: E402
import devtls  # noqa: E402
import providers  # noqa: E402
import report  # noqa: E402

PASSWORD = "bench-password"  # the local password devices give oxbridge and emailproxy
USERS = ["alice@example.test", "bob@example.test"]  # mailboxes of the test upstream
SCOPE = "https://outlook.office365.com/.default"
MiB = 1 << 20

# The loopback ports of the processes this script starts, by role (a role
# with names has one port per name). Each is picked free when the run starts
# (hold_ports) and held until it ends; "oxb_scale" gets one port per process.
PORT_ROLES = {
    "oxb_real": ("imap", "pop3", "smtp"),
    "ep_real": ("imap", "pop3", "smtp"),
    "ep_fake": ("imap", "pop3", "smtp"),
    "fake": ("imap", "pop3", "smtp", "http"),
    "oxb_fake": ("imap", "pop3", "smtp"),
    "oxb_tokens": None,
    "oxb_argon2": None,
    "oxb_swap": ("imap", "admin"),
    "oxb_swapfast": ("imap", "admin", "up"),
    "ep_swap": None,
    "idleup": None,
    "oxb_idlemem": None,
    "oxb_spool": ("session", "spool", "admin"),
    "oxb_devtls": ("rustls", "legacy"),
    "oxb_prov": ("imap", "pop3", "smtp", "admin"),
    "ep_prov_microsoft": ("imap", "pop3", "smtp"),
    "ep_prov_google": ("imap", "pop3", "smtp"),
}
PORTS = {}
HELD = []  # the sockets that hold the ports while the run lasts


def hold_port(port=0):
    """Bind 127.0.0.1:port (0: a free port the kernel picks) with
    SO_REUSEADDR, without listening, and keep the socket until this process
    exits; returns the port. While it is held, no other run's pick, no
    client connection's local port and no other program's plain bind can
    take the port, yet the process it is meant for can listen on it: every
    server started here binds with SO_REUSEADDR, which Linux lets share a
    port with a socket that does not listen. OSError if the port is taken."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    HELD.append(s)
    return s.getsockname()[1]


def hold_ports(scale):
    """Fill PORTS: a free port for every role and for each of `scale` scale
    processes, held until the run ends."""
    for role, names in PORT_ROLES.items():
        PORTS[role] = {n: hold_port() for n in names} if names else hold_port()
    PORTS["oxb_scale"] = [hold_port() for _ in range(scale)]


def hold_ports_cmd(argv):
    """bench.py hold-ports VAR=[PORT]...: bench/run's ports for the test
    upstream. Holds each PORT, or a free port where it is empty, prints a
    VAR=port line each and then `held`, and keeps holding them until its
    parent exits. A port that is taken: a message naming it and VAR, exit 1."""
    parent = os.getppid()
    lines = []
    for spec in argv:
        var, _, want = spec.partition("=")
        if not re.fullmatch(r"\d{0,5}", want) or int(want or 0) > 65535:
            sys.exit(f"{var}={want}: not a port number")
        try:
            lines.append(f"{var}={hold_port(int(want or 0))}")
        except OSError as e:
            sys.exit(f"port {want} ({var}) is in use by another program ({e.strerror}): "
                     f"set {var} to a free port, or unset it to let bench/run pick one")
    print("\n".join(lines + ["held"]), flush=True)
    while os.getppid() == parent:
        time.sleep(0.5)


def scale_procs(n):
    """oxbridge processes for n scale sessions: each relayed session holds
    two sockets in oxbridge; keep 200 spare under the descriptor limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    k = 1
    while 2 * math.ceil(n / k) + 200 > hard:
        k += 1
    return k


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


def oxbridge_config(path, state, upstream, ca, token_url, listeners, accounts, log_level="warn", log_format=None,
                    admin=None):
    lines = [
        f"state_dir = {toml_str(state)}",
        "[log]",
        f'level = "{log_level}"',
    ]
    if log_format:
        lines.append(f'format = "{log_format}"')
    if admin:
        lines += ["[admin]", f'listen = "127.0.0.1:{admin}"']
    lines += [
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


# ---------------------------------------------------------------- IMAP clients for the swap and idlemem workloads

def imap_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Imap:
    """A small blocking IMAP client, plain or implicit TLS, one session."""

    def __init__(self, port, ca=None, timeout=30):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = raw.getsockname()[1]
        if ca:
            raw = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
        self.sock = raw
        self.buf = bytearray()
        self.n = 0
        self.greeting = self.line()

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("connection closed by the server")
            self.buf += d

    def send(self, data):
        self.sock.sendall(data)

    def tag(self):
        self.n += 1
        return f"b{self.n}"

    def command(self, text, literal=None):
        """Send a command; return (its tagged line, the untagged lines before it)."""
        tag = self.tag()
        if literal is None:
            self.send(f"{tag} {text}\r\n".encode())
        else:  # LITERAL+
            self.send(f"{tag} {text} {{{len(literal)}+}}\r\n".encode() + literal + b"\r\n")
        untagged = []
        while True:
            ln = self.line()
            if ln.startswith(tag.encode() + b" "):
                return ln, untagged
            if ln.startswith(b"+"):  # an error challenge (XOAUTH2): answer it empty
                self.send(b"\r\n")
            untagged.append(ln)

    def ok(self, text, literal=None):
        ln, untagged = self.command(text, literal)
        if ln.split(b" ", 2)[1:2] != [b"OK"]:
            raise RuntimeError(f"{text.split()[0]}: {ln.decode(errors='replace')}")
        return untagged

    def login(self, user, password=None, token=None):
        if token:
            ir = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
            self.ok(f"AUTHENTICATE XOAUTH2 {ir}")
        else:
            self.ok(f"LOGIN {imap_quote(user)} {imap_quote(password)}")

    def close(self):
        try:
            self.sock.settimeout(5)
            self.command("LOGOUT")
        except (OSError, ConnectionError, RuntimeError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


EXISTS_RE = re.compile(rb"\* (\d+) EXISTS")


def sleep_until(t):
    while True:
        d = t - time.time()
        if d <= 0:
            return
        time.sleep(min(d, 0.5))


def swap_client(argv):
    """One device of the swap workload, in a process of its own (no GIL shared
    with the others); prints one JSON object. Times are epoch seconds."""
    ap = argparse.ArgumentParser(prog="bench.py swap-client")
    ap.add_argument("--role", choices=["idle", "noop", "append"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password")
    ap.add_argument("--token-file")
    ap.add_argument("--folder", default="INBOX")
    ap.add_argument("--start-at", type=float, default=0)
    ap.add_argument("--end-at", type=float, required=True)
    ap.add_argument("--period-ms", type=float, default=75)
    ap.add_argument("--gap-ms", type=float, default=0)
    ap.add_argument("--burst-at", default="", help="append: epoch times at which bursts start (comma-separated)")
    ap.add_argument("--burst-secs", type=float, default=2)
    ap.add_argument("--burst-ms", type=float, default=1, help="append: the period inside a burst")
    a = ap.parse_args(argv)
    token = open(a.token_file).read().strip() if a.token_file else None
    sleep_until(a.start_at)
    r = {"role": a.role}
    try:
        c = Imap(a.port, a.ca)
        r["local_port"] = c.local_port
        c.login(a.user, a.password, token)
        r["login_at"] = time.time()
        if a.role == "append":
            st = c.ok(f"STATUS {a.folder} (MESSAGES)")
            m = re.search(rb"MESSAGES (\d+)", b" ".join(st))
            r["count0"] = int(m.group(1)) if m else 0
            r["ok_at"], r["errors"] = [], []
            bursts = [float(x) for x in a.burst_at.split(",") if x]

            def next_at(t):
                dense = any(b <= t < b + a.burst_secs for b in bursts)
                nxt = t + (a.burst_ms if dense else a.period_ms) / 1000
                return nxt if dense else min([nxt] + [b for b in bursts if t < b < nxt])

            k = 0
            at = r["login_at"] + 0.2
            while True:
                if k:
                    at = next_at(at)
                if at >= a.end_at:
                    break
                sleep_until(at)
                k += 1
                msg = (f"From: bench@example.test\r\nTo: {a.user}\r\nSubject: swap bench {k}\r\n"
                       f"Message-ID: <swap-{k}-{at:.3f}@bench.invalid>\r\n\r\nmessage {k}\r\n").encode()
                ln, _ = c.command(f"APPEND {a.folder}", msg)
                if ln.split(b" ", 2)[1:2] == [b"OK"]:
                    r["ok_at"].append(round(time.time(), 6))
                else:
                    r["errors"].append(ln.decode(errors="replace"))
                    break  # message numbers would no longer follow the count
        else:
            sel = c.ok(f"SELECT {a.folder}")
            r["exists0"] = max([int(m.group(1)) for m in map(EXISTS_RE.match, sel) if m] or [0])
        if a.role == "noop":
            r["t"], r["rtt_ms"] = [], []
            while time.time() < a.end_at:
                t0 = time.time()
                ln, _ = c.command("NOOP")
                t1 = time.time()
                if ln.split(b" ", 2)[1:2] != [b"OK"]:
                    r["error"] = ln.decode(errors="replace")
                    break
                r["t"].append(round(t0, 6))
                r["rtt_ms"].append(round((t1 - t0) * 1000, 3))
                if a.gap_ms:
                    time.sleep(a.gap_ms / 1000)
        if a.role == "idle":
            tag = c.tag()
            c.send(f"{tag} IDLE\r\n".encode())
            ev = r["exists"] = []
            while True:
                ln = c.line()
                if ln.startswith(b"+"):
                    break
                m = EXISTS_RE.match(ln)
                if m:
                    ev.append((round(time.time(), 6), int(m.group(1))))
            r["idle_at"] = time.time()
            while True:
                left = a.end_at - time.time()
                if left <= 0:
                    break
                c.sock.settimeout(left)
                try:
                    ln = c.line()
                except TimeoutError:
                    break
                t = time.time()
                m = EXISTS_RE.match(ln)
                if m:
                    ev.append((round(t, 6), int(m.group(1))))
                elif ln.startswith(b"* BYE"):
                    r["bye"] = {"at": t, "line": ln.decode(errors="replace")}
                    break
            if "bye" not in r:  # still there: DONE gets the server's own completion
                c.sock.settimeout(10)
                c.send(b"DONE\r\n")
                while True:
                    ln = c.line()
                    if ln.startswith(tag.encode() + b" "):
                        r["done"] = ln.decode(errors="replace")
                        break
                    m = EXISTS_RE.match(ln)
                    if m:
                        ev.append((round(time.time(), 6), int(m.group(1))))
        if "bye" not in r:
            c.close()
        else:
            try:  # the server closes after its BYE
                c.sock.settimeout(5)
                while c.sock.recv(4096):
                    pass
                r["closed_after_bye"] = True
            except OSError:
                pass
    except (OSError, ConnectionError, RuntimeError) as e:
        r["error"] = f"{type(e).__name__}: {e}"
        r["error_at"] = time.time()
    print(json.dumps(r))


def parse_log_time(s):
    """RFC 3339 (tracing's JSON timestamps, any number of fraction digits) to epoch seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        return None
    base = datetime.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def oxbridge_swaps(logfile):
    """The 'IMAP session moved' lines of an oxbridge JSON log: end time, held_ms, device port."""
    swaps, refusals = [], []
    with open(logfile, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            msg = e.get("message") or e.get("fields", {}).get("message", "")
            peer = (e.get("span") or {}).get("peer") or next(
                (s.get("peer") for s in e.get("spans", []) if s.get("peer")), "")
            port = int(peer.rsplit(":", 1)[1]) if ":" in peer else None
            if msg.startswith("IMAP session moved to a new upstream login"):
                swaps.append({"end": parse_log_time(e.get("timestamp", "")), "held_ms": e.get("held_ms"),
                              "token_left_s": e.get("token_left_s"), "port": port})
            elif "could not move" in msg:
                refusals.append({"at": e.get("timestamp"), "reason": e.get("reason"), "port": port})
    return swaps, refusals


def metric_lines(url, prefixes):
    try:
        with no_proxy.open(url, timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return [f"unavailable: {e}"]
    return [ln for ln in text.splitlines() if ln.startswith(prefixes)]


def idle_delays(append, idle):
    """Per message appended while this session was in IDLE: (APPEND OK time,
    ms from it to the first `* n EXISTS` with n >= its number, or None if
    none came)."""
    ev = sorted(idle.get("exists", []))
    out, j, best, last = [], 0, 0, None
    c0 = append.get("count0", 0)
    since = idle.get("idle_at") or float("inf")
    for k, ok_at in enumerate(append.get("ok_at", []), start=1):
        seq = c0 + k
        while j < len(ev) and best < seq:
            best = max(best, ev[j][1])
            last = ev[j][0]
            j += 1
        if ok_at >= since:
            out.append((ok_at, round((last - ok_at) * 1000, 3) if best >= seq else None))
    return out


def idle_stats(app, cl, swaps, pre, post):
    """The swap workload's numbers for one IDLE device (see README.md)."""
    mine = [s for s in swaps if s["port"] == cl.get("local_port") and s["end"]]
    ended = cl.get("bye") or ({"at": cl.get("error_at"), "line": cl["error"]} if cl.get("error") else None)
    until = ended["at"] if ended and ended.get("at") else float("inf")
    pairs = [(t, x) for t, x in idle_delays(app, cl) if t < until - 0.5]
    missing = sum(1 for _, x in pairs if x is None)
    pairs = [(t, x) for t, x in pairs if x is not None]
    hold = lambda s: (s["held_ms"] or 0) / 1000
    wins = [(s["end"] - hold(s) - pre, s["end"] + post) for s in mine]
    far = [(s["end"] - hold(s) - 1.0, s["end"] + 1.0) for s in mine]
    per_swap = []
    for s, (a, b) in zip(mine, wins):
        ds = [x for t, x in pairs if a <= t <= b]
        # appended during the hold (held_ms is in whole ms: up to 1 ms more)
        hs = [x for t, x in pairs if s["end"] - hold(s) - 0.001 <= t <= s["end"]]
        per_swap.append({"held_ms": s["held_ms"], "at": s["end"], "messages": len(ds),
                         "max_ms": max(ds) if ds else None, "delays_ms": ds if len(ds) <= 20 else None,
                         "in_hold": len(hs), "in_hold_max_ms": max(hs) if hs else None})
    in_win = [x for t, x in pairs if any(a <= t <= b for a, b in wins)]
    base = [x for t, x in pairs if not any(a <= t <= b for a, b in far)]
    return {
        "login_at": cl.get("login_at"), "swaps": per_swap, "baseline_n": len(base),
        "baseline_p50_ms": report.pct(base, 50), "baseline_p99_ms": report.pct(base, 99),
        "baseline_max_ms": max(base) if base else None,
        "swap_n": len(in_win), "swap_p50_ms": report.pct(in_win, 50), "swap_max_ms": max(in_win) if in_win else None,
        "messages": len(pairs), "no_exists": missing, "done": cl.get("done"),
        "ended": ({"line": ended["line"], "after_s": round(ended["at"] - cl["login_at"], 2)
                   if ended.get("at") and cl.get("login_at") else None} if ended else None),
        "error": cl.get("error"),
    }


def held_mean_ms(metrics):
    """Mean hold from the oxbridge_imap_swap_duration_seconds histogram."""
    v = {}
    for m in metrics:
        parts = m.split()
        if len(parts) == 2 and parts[0] in ("oxbridge_imap_swap_duration_seconds_sum",
                                            "oxbridge_imap_swap_duration_seconds_count"):
            v[parts[0].rsplit("_", 1)[1]] = float(parts[1])
    return round(v["sum"] / v["count"] * 1000, 3) if v.get("count") else None


def swap_workload(args, up, out, procs, N, phc, real, ca, real_token, ftls):
    front = up.get("EXPIRY_IMAPS_PORT")
    if not front:
        return {"failed": "the test upstream runs without its session-expiry front (OXB_EXPIRE_SESSIONS=1)"}
    front = int(front)
    ttl, secs = N["swap_ttl"], N["swap_secs"]
    ttl_url = f"{up['IDP_URL']}/ttl-{ttl}/oauth2/v2.0/token"
    P, F = PORTS["oxb_swap"], PORTS["oxb_swapfast"]
    accounts = [{"login": u, "password_hash": phc, "grant": "client_credentials"} for u in USERS]
    # oxbridge with the front as its IMAP upstream (Dovecot behind it)
    cfg = os.path.join(out, "oxbridge-swap.toml")
    oxbridge_config(cfg, os.path.join(out, "state-swap"),
                    {"imap": f"localhost:{front}", "pop3": f"localhost:{real['pop3']}",
                     "smtp": f"localhost:{real['smtp']}"}, ca, ttl_url, [("imap", P["imap"])], accounts,
                    log_level="info", log_format="json", admin=P["admin"])
    procs.start("oxbridge-swap", [args.oxbridge, "run", "--config", cfg], wait_ports=[P["imap"], P["admin"]])
    # and one with the in-memory upstream, which announces new messages at once
    # (Dovecot batches its IDLE notifications, 0.5 s after the first change)
    procs.start("idleup-swap", [sys.executable, os.path.abspath(__file__), "idle-upstream", "--port", F["up"],
                                "--cert", ftls["cert"], "--key", ftls["key"]], wait_ports=[F["up"]])
    fcfg = os.path.join(out, "oxbridge-swapfast.toml")
    oxbridge_config(fcfg, os.path.join(out, "state-swapfast"),
                    {"imap": f"localhost:{F['up']}", "pop3": f"localhost:{real['pop3']}",
                     "smtp": f"localhost:{real['smtp']}"}, ftls["ca"], ttl_url, [("imap", F["imap"])], accounts,
                    log_level="info", log_format="json", admin=F["admin"])
    procs.start("oxbridge-swapfast", [args.oxbridge, "run", "--config", fcfg], wait_ports=[F["imap"], F["admin"]])
    ep_port = None
    if args.emailproxy:
        epcfg = os.path.join(out, "emailproxy-swap.config")
        emailproxy_config(epcfg, [("imap", PORTS["ep_swap"], "127.0.0.1", front)], [(USERS[0], ttl_url)])
        procs.start("emailproxy-swap", [args.emailproxy, "--no-gui", "--config-file", epcfg,
                                        "--log-file", os.path.join(out, "emailproxy-swap-own.log")],
                    env={"SSL_CERT_FILE": ca, "no_proxy": "*", "NO_PROXY": "*"}, wait_ports=[PORTS["ep_swap"]])
        ep_port = PORTS["ep_swap"]
    folder = "bench-swap"
    c = Imap(real["imap"], ca)
    c.login(USERS[0], token=open(real_token).read().strip())
    c.command(f"CREATE {folder}")  # NO if it is there already
    c.close()
    # a direct client holds a token of the same lifetime, straight from the IDP
    dtok = http(ttl_url, {"grant_type": "client_credentials", "client_id": "test-app",
                          "client_secret": "test-app-secret", "scope": SCOPE})["access_token"]
    dtok_file = os.path.join(out, f"direct-token-ttl{ttl}")
    with open(dtok_file, "w") as f:
        f.write(dtok)

    t0 = time.time() + 0.5
    end = t0 + secs
    at = lambda d: f"{t0 + d:.3f}"
    me = [sys.executable, os.path.abspath(__file__), "swap-client"]
    idle = lambda port, *more: ["--role", "idle", "--port", port, "--user", USERS[0], "--folder", folder,
                                "--end-at", f"{end:.3f}", *more]
    append_end = f"{end - 1.0:.3f}"  # the last messages get announced before the devices stop
    # The instant upstream's appender sends a message every swap_burst_ms for
    # swap_burst_secs around each expected swap of its IDLE device (about
    # 3/4 of a token lifetime after its login, then every 3/4), so that some
    # arrive during the hold, which lasts about a millisecond.
    lead = ttl * 3 / 4
    bursts = ",".join(f"{t0 + N['swap_instant_delay'] + lead * (i + 1) - N['swap_burst_secs'] / 2:.3f}"
                      for i in range(int((secs - N["swap_instant_delay"]) // lead)))
    # The three oxbridge sessions log in at different times, so that their
    # swaps (~15 s after login, then every ~15 s) do not coincide: both
    # oxbridge processes fetch their own app-only token at the first login.
    roles = {
        "append": ["--role", "append", "--port", real["imap"], "--ca", ca, "--token-file", real_token,
                   "--user", USERS[0], "--folder", folder, "--start-at", at(0), "--end-at", append_end,
                   "--period-ms", N["swap_append_ms"]],
        "idle-oxbridge": idle(P["imap"], "--password", PASSWORD, "--start-at", at(0)),
        "idle-direct": idle(front, "--ca", ca, "--token-file", dtok_file, "--start-at", at(0)),
        "noop-oxbridge": ["--role", "noop", "--port", P["imap"], "--user", USERS[1], "--password", PASSWORD,
                          "--start-at", at(N["swap_noop_delay"]), "--end-at", f"{end:.3f}",
                          "--gap-ms", N["swap_noop_gap_ms"]],
        "append-instant": ["--role", "append", "--port", F["up"], "--ca", ftls["ca"], "--token-file", real_token,
                           "--user", USERS[0], "--folder", folder, "--start-at", at(0), "--end-at", append_end,
                           "--period-ms", N["swap_append_ms"], "--burst-ms", N["swap_burst_ms"],
                           "--burst-secs", N["swap_burst_secs"], "--burst-at", bursts],
        "idle-instant": idle(F["imap"], "--password", PASSWORD, "--start-at", at(N["swap_instant_delay"])),
    }
    if ep_port:
        roles["idle-emailproxy"] = idle(ep_port, "--password", PASSWORD, "--start-at", at(0))
    log(f"swap: {secs} s with {ttl}-s tokens; through oxbridge to the expiry front (:{front}, Dovecot): an IDLE "
        f"device and a NOOP device; IDLE devices direct{' and through emailproxy' if ep_port else ''}; through "
        f"oxbridge to an in-memory upstream: an IDLE device; an APPEND every {N['swap_append_ms']} ms to each")
    pids = {n: procs.procs[n].pid for n in ("oxbridge-swap", "oxbridge-swapfast")}
    cpu0 = {n: proc_cpu(p) for n, p in pids.items()}
    running = {name: subprocess.Popen(me + [str(x) for x in argv], stdout=subprocess.PIPE,
                                      stderr=open(os.path.join(out, f"swap-{name}.log"), "ab"))
               for name, argv in roles.items()}
    got = {}
    for name, p in running.items():
        try:
            o, _ = p.communicate(timeout=secs + 60)
            got[name] = json.loads(o.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            p.kill()
            got[name] = {"error": f"no result: {e}"}
    want = ("oxbridge_imap_swap", "oxbridge_upstream_expiries_total")
    metrics = metric_lines(f"http://127.0.0.1:{P['admin']}/metrics", want)
    fmetrics = metric_lines(f"http://127.0.0.1:{F['admin']}/metrics", want)
    cpu = {n: proc_cpu(p) for n, p in pids.items()}
    for name in ("oxbridge-swap", "oxbridge-swapfast", "idleup-swap", "emailproxy-swap"):
        procs.stop(name)
    swaps, refusals = oxbridge_swaps(os.path.join(out, "oxbridge-swap.log"))
    fswaps, frefusals = oxbridge_swaps(os.path.join(out, "oxbridge-swapfast.log"))
    front_expired = 0
    if up.get("FRONT_LOG") and os.path.exists(up["FRONT_LOG"]):
        with open(up["FRONT_LOG"], errors="replace") as f:
            for line in f:
                m = re.search(r"event=expired .*?at=([\d.]+)", line)
                if m and t0 - 1 <= float(m.group(1)) <= end + 2:
                    front_expired += 1

    pre, post = N["swap_window_before_ms"] / 1000, N["swap_window_after_ms"] / 1000
    app, fapp = got.get("append", {}), got.get("append-instant", {})
    r = {"ttl_s": ttl, "secs": secs, "append_ms": N["swap_append_ms"], "noop_gap_ms": N["swap_noop_gap_ms"],
         "noop_delay_s": N["swap_noop_delay"], "instant_delay_s": N["swap_instant_delay"],
         "burst_ms": N["swap_burst_ms"], "burst_secs": N["swap_burst_secs"],
         "window_before_ms": N["swap_window_before_ms"], "window_after_ms": N["swap_window_after_ms"],
         "appended": len(app.get("ok_at", [])), "append_errors": app.get("errors") or app.get("error"),
         "appended_instant": len(fapp.get("ok_at", [])),
         "append_instant_errors": fapp.get("errors") or fapp.get("error"),
         "metrics": metrics, "metrics_instant": fmetrics,
         "held_mean_ms": held_mean_ms(metrics), "held_mean_instant_ms": held_mean_ms(fmetrics),
         "refusals": refusals + frefusals, "front_expired": front_expired,
         "oxbridge_cpu_s": {n: None if cpu[n] is None or cpu0[n] is None else round(cpu[n] - cpu0[n], 3)
                            for n in pids},
         "idle": {}, "idle_instant": None, "noop": {}}
    for name in [n for n in roles if n.startswith("idle-") and n != "idle-instant"]:
        r["idle"][name.split("-", 1)[1]] = idle_stats(app, got[name], swaps, pre, post)
    r["idle_instant"] = idle_stats(fapp, got["idle-instant"], fswaps, pre, post)
    cl = got.get("noop-oxbridge", {})
    mine = [s for s in swaps if s["port"] == cl.get("local_port") and s["end"]]
    ts, rtt = cl.get("t", []), cl.get("rtt_ms", [])
    per_swap = []
    for s in mine:
        # the hold: from the pause (held_ms before the log line; whole ms, so
        # up to 1 ms more) to the log line
        a, b = s["end"] - ((s["held_ms"] or 0) + 1) / 1000, s["end"]
        over = [x for t, x in zip(ts, rtt) if t <= b and t + x / 1000 >= a]
        near = [x for t, x in zip(ts, rtt) if a - pre <= t <= b + post]
        per_swap.append({"held_ms": s["held_ms"], "at": s["end"], "overlapping": len(over),
                         "max_overlapping_ms": max(over) if over else None,
                         "max_near_ms": max(near) if near else None})
    r["noop"]["oxbridge"] = {
        "n": len(rtt), "p50_ms": report.pct(rtt, 50), "p99_ms": report.pct(rtt, 99), "p999_ms": report.pct(rtt, 99.9),
        "max_ms": max(rtt) if rtt else None, "swaps": per_swap, "error": cl.get("error"),
        "secs": round(ts[-1] - ts[0], 1) if ts else None,
    }

    # The busy mailbox, after the quiet devices: a fresh oxbridge on the
    # same ports (a cold token cache, so the first moves come 3/4 of a token
    # lifetime after the logins; metrics of its own), and a fresh emailproxy.
    def start_oxbridge():
        bcfg = os.path.join(out, "oxbridge-swapbusy.toml")
        oxbridge_config(bcfg, os.path.join(out, "state-swapbusy"),
                        {"imap": f"localhost:{front}", "pop3": f"localhost:{real['pop3']}",
                         "smtp": f"localhost:{real['smtp']}"}, ca, ttl_url, [("imap", P["imap"])], accounts,
                        log_level="info", log_format="json", admin=P["admin"])
        procs.start("oxbridge-swapbusy", [args.oxbridge, "run", "--config", bcfg],
                    wait_ports=[P["imap"], P["admin"]])

    def start_emailproxy():
        bep = os.path.join(out, "emailproxy-swapbusy.config")
        emailproxy_config(bep, [("imap", PORTS["ep_swap"], "127.0.0.1", front)], [(N["busy_user"], ttl_url)])
        procs.start("emailproxy-swapbusy", [args.emailproxy, "--no-gui", "--config-file", bep,
                                            "--log-file", os.path.join(out, "emailproxy-swapbusy-own.log")],
                    env={"SSL_CERT_FILE": ca, "no_proxy": "*", "NO_PROXY": "*"}, wait_ports=[PORTS["ep_swap"]])

    try:  # a failure here must not lose the quiet phase's results
        r["busy"] = busy.phase(args, out, procs, N, real, ca, real_token,
                               {"oxbridge": P["imap"], "admin": P["admin"], "emailproxy": PORTS["ep_swap"]},
                               PASSWORD, start_oxbridge, start_emailproxy,
                               (Imap, sleep_until, oxbridge_swaps, metric_lines, parse_log_time, log))
    except (OSError, ConnectionError, RuntimeError, SystemExit, ValueError) as e:
        log(f"swap, busy mailbox: failed: {e}")
        r["busy"] = {"failed": f"{type(e).__name__}: {e}"}
        for name in ("oxbridge-swapbusy", "emailproxy-swapbusy"):
            procs.stop(name)
    return r


def proc_cpu(pid):
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------- an in-memory IMAPS upstream that IDLEs

def idle_upstream(argv):
    """A minimal IMAPS upstream (fakeup has no IDLE) for the idlemem workload
    and the swap workload's instant-notification path: any XOAUTH2 login, one
    mailbox shared by every session and every name (one message at the
    start), SELECT/EXAMINE, STATUS, APPEND (which announces `* n EXISTS` at
    once to every session that has the mailbox selected, in IDLE or not),
    IDLE until DONE, UID SEARCH, FETCH/UID FETCH of UIDs only (message i has
    UID i), NOOP, LOGOUT; anything else gets OK."""
    ap = argparse.ArgumentParser(prog="bench.py idle-upstream")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args(argv)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    caps = b"IMAP4rev1 SASL-IR LITERAL+ ID IDLE ENABLE UIDPLUS"
    literal = re.compile(rb"\{(\d+)(\+?)\}\r?\n$")
    box = {"n": 1}
    selected = set()

    async def session(r, w):
        try:
            w.write(b"* OK [CAPABILITY " + caps + b" AUTH=XOAUTH2] idleup ready\r\n")
            while True:
                line = await r.readline()
                if not line:
                    break
                parts = line.split()
                if len(parts) < 2:
                    w.write(b"* BAD empty command\r\n")
                    continue
                tag, cmd = parts[0], parts[1].upper()
                if cmd == b"AUTHENTICATE":
                    if len(parts) < 4:
                        w.write(b"+ \r\n")
                        await w.drain()
                        await r.readline()
                    w.write(tag + b" OK [CAPABILITY " + caps + b"] Logged in\r\n")
                elif cmd == b"CAPABILITY":
                    w.write(b"* CAPABILITY " + caps + b" AUTH=XOAUTH2\r\n" + tag + b" OK Capability completed\r\n")
                elif cmd in (b"SELECT", b"EXAMINE"):
                    n = box["n"]
                    w.write(b"* FLAGS (\\Seen \\Deleted)\r\n* %d EXISTS\r\n* 0 RECENT\r\n"
                            b"* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT %d] Predicted next UID\r\n"
                            % (n, n + 1) + tag + b" OK [READ-WRITE] Select completed\r\n")
                    selected.add(w)
                elif cmd == b"STATUS":
                    w.write(b"* STATUS %s (MESSAGES %d)\r\n" % (parts[2] if len(parts) > 2 else b"INBOX", box["n"])
                            + tag + b" OK Status completed\r\n")
                elif cmd == b"APPEND":
                    m = literal.search(line)
                    if m:
                        if not m.group(2):
                            w.write(b"+ Ready for literal data\r\n")
                            await w.drain()
                        await r.readexactly(int(m.group(1)))
                        await r.readline()
                    box["n"] += 1
                    n = box["n"]
                    for o in list(selected):
                        if o is not w:
                            o.write(b"* %d EXISTS\r\n" % n)
                    w.write(tag + b" OK [APPENDUID 1 %d] Append completed\r\n" % n)
                elif cmd == b"IDLE":
                    w.write(b"+ idling\r\n")
                    await w.drain()
                    if not await r.readline():
                        break
                    w.write(tag + b" OK Idle completed\r\n")
                elif (cmd == b"FETCH" or (cmd == b"UID" and len(parts) > 2 and parts[2].upper() == b"FETCH")) \
                        and line.rstrip().upper().endswith(b"(UID)"):
                    # A moving session's `FETCH k:* (UID)` / `UID FETCH k:* (UID)`:
                    # message i has UID i; k:* past the end is the last message.
                    n = box["n"]
                    first = int(parts[3 if cmd == b"UID" else 2].split(b":")[0])
                    w.write(b"".join(b"* %d FETCH (UID %d)\r\n" % (i, i)
                                     for i in range(min(max(first, 1), n), n + 1) if n)
                            + tag + b" OK Fetch completed\r\n")
                elif cmd == b"UID" and len(parts) > 2 and parts[2].upper() == b"SEARCH":
                    w.write(b"* SEARCH " + b" ".join(b"%d" % i for i in range(1, box["n"] + 1)) + b"\r\n"
                            + tag + b" OK Search completed\r\n")
                elif cmd == b"LOGOUT":
                    w.write(b"* BYE idleup logging out\r\n" + tag + b" OK Logout completed\r\n")
                    await w.drain()
                    break
                else:
                    w.write(tag + b" OK " + cmd + b" completed\r\n")
                await w.drain()
        except (OSError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            selected.discard(w)
            w.close()

    async def serve():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        srv = await asyncio.start_server(session, "127.0.0.1", a.port, ssl=ctx, backlog=4096)
        async with srv:
            await stop.wait()

    asyncio.run(serve())


async def idle_sessions(port, creds, n, conc, timeout):
    """Open n IMAP sessions (LOGIN, SELECT INBOX, IDLE) and hold them in IDLE.
    Returns the held sessions, the errors and the time all took."""
    sem = asyncio.Semaphore(conc)
    held, errors = [], []

    async def until(r, prefix):
        while True:
            ln = await r.readline()
            if not ln:
                raise ConnectionError("connection closed")
            if ln.startswith(prefix):
                return ln

    async def one(i):
        user, pw = creds[i % len(creds)]
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)

                async def steps():
                    await r.readline()
                    w.write(f"a LOGIN {imap_quote(user)} {imap_quote(pw)}\r\n".encode())
                    if not (await until(r, b"a ")).startswith(b"a OK"):
                        raise RuntimeError("LOGIN refused")
                    w.write(b"b SELECT INBOX\r\n")
                    if not (await until(r, b"b ")).startswith(b"b OK"):
                        raise RuntimeError("SELECT refused")
                    w.write(b"c IDLE\r\n")
                    await until(r, b"+")

                await asyncio.wait_for(steps(), timeout)
                held.append((r, w))
            except (OSError, ConnectionError, RuntimeError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    t = time.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return held, errors, time.time() - t


async def idle_release(held, timeout=30):
    """DONE on each held session (counting the tagged OKs), then LOGOUT."""
    async def one(r, w):
        try:
            w.write(b"DONE\r\n")
            ln = await asyncio.wait_for(r.readline(), timeout)
            while ln and not ln.startswith(b"c "):
                ln = await asyncio.wait_for(r.readline(), timeout)
            ok = ln.startswith(b"c OK")
            w.write(b"d LOGOUT\r\n")
            await asyncio.wait_for(w.drain(), 5)
            return ok
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return False
        finally:
            w.close()

    return sum(await asyncio.gather(*(one(r, w) for r, w in held)))


def idlemem_workload(args, out, procs, N, upstream_fake, ftls, fake_token_url):
    n = N["idle_sessions"]
    up_port, port = PORTS["idleup"], PORTS["oxb_idlemem"]
    procs.start("idleup", [sys.executable, os.path.abspath(__file__), "idle-upstream", "--port", up_port,
                           "--cert", ftls["cert"], "--key", ftls["key"]], wait_ports=[up_port], nofile=1 << 20)
    cfg = os.path.join(out, "oxbridge-idlemem.toml")
    oxbridge_config(cfg, os.path.join(out, "state-idlemem"), dict(upstream_fake, imap=f"localhost:{up_port}"),
                    ftls["ca"], fake_token_url, [("imap", port)], [{"login": "*@example.test", "grant": "password"}])
    p = procs.start("oxbridge-idlemem", [args.oxbridge, "run", "--config", cfg], wait_ports=[port], nofile=1 << 20)
    creds = [(f"user{i}@example.test", f"user{i}-password") for i in range(10)]
    fresh = rss_kib(p.pid)

    async def run():
        # warm: one session per account, in and out of IDLE (token cache, buffers)
        for i in range(len(creds)):
            h, e, _ = await idle_sessions(port, creds[i:i + 1], 1, 1, 15)
            await idle_release(h)
            if e:
                return {"failed": f"warm-up session: {e[0]}"}
        await asyncio.sleep(1)
        rss0, fds0 = rss_kib(p.pid), proc_fds(p.pid)
        log(f"idlemem: {n} IMAP sessions held in IDLE through oxbridge ({args.oxbridge})")
        held, errors, took = await idle_sessions(port, creds, n, 100, 60)
        await asyncio.sleep(2)
        rss1, fds1 = rss_kib(p.pid), proc_fds(p.pid)
        alive = await idle_release(held)
        return {"sessions": n, "held": len(held), "errors": len(errors), "error_samples": sorted(set(errors))[:3],
                "establish_s": round(took, 2), "rss_fresh_kib": fresh, "rss0_kib": rss0, "rss1_kib": rss1,
                "rss_per_session_kib": round((rss1 - rss0) / len(held), 2) if held else None,
                "fds_added": None if fds0 is None or fds1 is None else fds1 - fds0, "done_ok": alive}

    r = asyncio.run(run())
    r["binary"] = args.oxbridge
    procs.stop("oxbridge-idlemem")
    procs.stop("idleup")
    return r


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def delivered_count(admin):
    """oxbridge_spool_deliveries_total{result="delivered"} from /metrics."""
    total = 0.0
    for line in metric_lines(f"http://127.0.0.1:{admin}/metrics", ("oxbridge_spool_deliveries_total",)):
        if 'result="delivered"' in line and not line.startswith("unavailable"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def spool_workload(args, out, procs, N, phc, real, ca, token_url, real_token, ep_ports, ep_pid):
    """Messages per second through one SMTP session: straight to Postfix,
    through an oxbridge session listener (live relay), into an oxbridge
    spooling listener (accepted: 250 once on disk; delivered: until the
    worker has handed all of them to Postfix), and through emailproxy."""
    P = PORTS["oxb_spool"]
    cfg = os.path.join(out, "oxbridge-spool.toml")
    oxbridge_config(cfg, os.path.join(out, "state-spool"), {p: f"localhost:{real[p]}" for p in real}, ca, token_url,
                    [("smtp", P["session"]), ("smtp", P["spool"])],
                    [{"login": u, "password_hash": phc, "grant": "client_credentials"} for u in USERS],
                    admin=P["admin"])
    text = open(cfg).read()
    mark = f'listen = "127.0.0.1:{P["spool"]}"\n'
    text = text.replace(mark, mark + 'delivery = "spool"\n')
    # Exchange allows 30 a minute per mailbox; the benchmark measures the ceiling.
    text += "[spool]\nmessages_per_minute = 1000000\nretry_min_s = 1\n"
    with open(cfg, "w") as f:
        f.write(text)
    p = procs.start("oxbridge-spool", [args.oxbridge, "run", "--config", cfg], wait_ports=[P["session"], P["spool"]])
    user = f"{USERS[0]}:{PASSWORD}"
    size, reps = N["spool_size"], N["spool_reps"]
    paths = {
        "direct": ["--mode", "direct", "--addr", f"127.0.0.1:{real['smtp']}", "--ca", ca, "--token-file", real_token],
        "session": ["--mode", "plain", "--addr", f"127.0.0.1:{P['session']}"],
        "spool": ["--mode", "plain", "--addr", f"127.0.0.1:{P['spool']}"],
    }
    if ep_ports:
        paths["emailproxy"] = ["--mode", "plain", "--addr", f"127.0.0.1:{ep_ports['smtp']}"]
    res = {"size": size, "reps": reps, "paths": {}}
    try:
        for r in range(N["spool_rounds"]):
            for path, spec in paths.items():
                log(f"spool {path} round {r + 1}: {reps} x {size} bytes in one session")
                before = delivered_count(P["admin"]) if path == "spool" else 0
                t0 = time.time()
                x = driver(args, "bulk", "--proto", "smtp", *spec, "--users", user,
                           "--pid", {"session": p.pid, "spool": p.pid, "emailproxy": ep_pid}.get(path) or 0,
                           "--size", size, "--reps", reps, "--from", USERS[0], "--rcpt", "sink@discard.invalid")
                taken = time.time() - t0
                run = {"accepted_s": sum(x.get("secs", [])) or None, "wall_s": taken, "failed": x.get("failed"),
                       "cpu_s": x.get("cpu_s")}
                if path == "spool" and not x.get("failed"):
                    deadline = time.time() + 300
                    while delivered_count(P["admin"]) < before + reps and time.time() < deadline:
                        time.sleep(0.05)
                    run["delivered_s"] = time.time() - t0
                    run["delivered"] = delivered_count(P["admin"]) - before
                res["paths"].setdefault(path, []).append(run)
    finally:
        procs.stop("oxbridge-spool")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True, help="state dir of the test upstream (upstream.json)")
    ap.add_argument("--oxbridge", required=True)
    ap.add_argument("--driver", required=True)
    ap.add_argument("--fakeup", required=True)
    ap.add_argument("--emailproxy", help="emailproxy executable (omit to skip that path)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="small counts, for trying the script out")
    ap.add_argument("--only", default="login,bulk,fastlogin,fastbulk,spool,scale,argon2,tokens,swap,idlemem,devtls,"
                                          "providers")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--idle-sessions", type=int, default=1000, help="IMAP sessions held in IDLE (idlemem)")
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
        # swap: tokens of swap_ttl s; the IDLE device's session moves at ~15, 30, 45 s, the NOOP
        # device's (logged in swap_noop_delay s later) at ~22, 37, 52 s, the instant-upstream IDLE
        # device's (swap_instant_delay s later) at ~18.5, 33.5, 48.5 s
        "swap_ttl": 20, "swap_secs": 56, "swap_append_ms": 75, "swap_noop_delay": 7, "swap_noop_gap_ms": 0,
        "swap_instant_delay": 3.5, "swap_burst_ms": 1, "swap_burst_secs": 2,
        "swap_window_before_ms": 250, "swap_window_after_ms": 50,
        # swap, busy mailbox (after the above): devices on one folder of busy_user, a command every
        # ~busy_gap_ms each, for busy_secs (moves at ~15, 30, 45 s ... after they log in)
        "busy_devices": 4, "busy_secs": 56 if q else 116, "busy_gap_ms": 20, "busy_idle_max_ms": 1500,
        "busy_user": USERS[0],
        "idle_sessions": min(args.idle_sessions, 300) if q else args.idle_sessions,
        # spool: messages of spool_size bytes, spool_reps per path and round
        "spool_size": 100_000, "spool_reps": 30 if q else 100, "spool_rounds": 1 if q else 3,
        # devtls: handshake workers (processes) for devtls_secs per case and round; FETCHes per case
        "devtls_workers": 8, "devtls_secs": 3 if q else 8, "devtls_rounds": 1 if q else 2,
        "devtls_fetch_reps": 3 if q else 10,
        # providers: sequential logins per path and protocol (split over the rounds), a batch of
        # prov_total at 50-way per round; emailproxy prov_ep_seq sequential logins, once
        "prov_seq": 6 if q else 20, "prov_total": 50 if q else 100, "prov_rounds": 1 if q else 2,
        "prov_ep_seq": 2 if q else 4,
    }
    up = json.load(open(os.path.join(args.upstream, "upstream.json")))
    res = {"machine": machine(), "params": N, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "oxbridge_commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip(),
           "oxbridge_binary": os.path.abspath(args.oxbridge)}
    hold_ports(scale_procs(N["sessions"]) if "scale" in only else 0)

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

    # ---------------------------------------------------------------- SMTP store and forward
    if "spool" in only:
        eps = {"smtp": PORTS["ep_real"]["smtp"]} if ep else None
        res["spool"] = spool_workload(args, out, procs, N, phc, real, ca, token_url, real_token, eps,
                                      ep.pid if ep else None)

    if ep:  # emailproxy is done: free the CPU
        procs.stop("emailproxy")
    procs.stop("oxbridge-real")

    # ---------------------------------------------------------------- a Microsoft and a Google account side by side
    if "providers" in only:
        try:
            res["providers"] = providers.workload(
                args, out, procs, N, up, phc, real, ca, real_token,
                {"oxb": PORTS["oxb_prov"], "ep_microsoft": PORTS["ep_prov_microsoft"],
                 "ep_google": PORTS["ep_prov_google"]},
                USERS, PASSWORD, {"oxbridge_config": oxbridge_config, "emailproxy_config": emailproxy_config,
                                  "driver": driver, "http": http, "metric_lines": metric_lines}, log)
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            log(f"providers: failed: {type(e).__name__}: {e}")
            res["providers"] = {"failed": f"{type(e).__name__}: {e}"[:300]}

    # ---------------------------------------------------------------- device-side TLS: rustls and OpenSSL
    if "devtls" in only:
        res["devtls"] = devtls.workload(args, out, procs, N, up, phc, real, ca, oxbridge_config,
                                        PORTS["oxb_devtls"], USERS, PASSWORD, proc_cpu, log)

    # ---------------------------------------------------------------- sessions moving before their token expires
    if "swap" in only:
        res["swap"] = swap_workload(args, up, out, procs, N, phc, real, ca, real_token, ftls)

    # ---------------------------------------------------------------- memory of sessions held in IDLE
    if "idlemem" in only:
        res["idlemem"] = idlemem_workload(args, out, procs, N, upstream_fake, ftls, fake_token_url)

    # ---------------------------------------------------------------- scale
    if "scale" in only:
        n = N["sessions"]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        k = scale_procs(n)
        # password-grant accounts: no Argon2 in this process, whose freed
        # memory would otherwise be reused by the sessions and hide their cost
        accts = [f"user{i}@example.test" for i in range(10)]
        creds = ",".join(f"{u}:{u.split('@')[0]}-password" for u in accts)
        addrs, spids, fresh = [], [], []
        for i in range(k):
            port = PORTS["oxb_scale"][i]
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
        port = PORTS["oxb_argon2"]
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
    if sys.argv[1:2] == ["swap-client"]:
        swap_client(sys.argv[2:])
    elif sys.argv[1:2] == ["busy-client"]:
        busy.client(sys.argv[2:], Imap, sleep_until)
    elif sys.argv[1:2] == ["idle-upstream"]:
        idle_upstream(sys.argv[2:])
    elif sys.argv[1:2] == ["hold-ports"]:
        hold_ports_cmd(sys.argv[2:])
    else:
        main()
