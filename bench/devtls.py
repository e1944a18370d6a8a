"""The devtls workload: what device-side TLS costs oxbridge.

One oxbridge process (real upstream) with two implicit-TLS IMAP listeners
on the test certificate (RSA 2048): the default one (rustls) and one with
`tls_min_version = "1.0"` (OpenSSL). Python's ssl (OpenSSL) is the device:

* handshakes: worker processes connect, shake hands, read the greeting and
  drop the connection (no login), for a fixed time, the three cases taking
  turns: rustls with TLS 1.3, the legacy listener with TLS 1.0 AES128-SHA
  (RSA key exchange, CBC), the legacy listener with TLS 1.2 (the client's
  default suites). Handshakes/s, and oxbridge's CPU (utime+stime from
  /proc/PID/stat) over the case's turns divided by its handshakes.
* bulk: LOGIN, SELECT INBOX and FETCH 1 BODY.PEEK[] of the 10 MiB message
  through a TLS 1.3 session (rustls) and a TLS 1.0 AES128-SHA session
  (OpenSSL), taking turns; MB/s per transfer and oxbridge's CPU s/GB.
"""
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import struct
import time

CASES = [
    # name, listener, client TLS
    ("rustls TLS 1.3", "rustls", "tls13"),
    ("OpenSSL TLS 1.0 AES128-SHA", "legacy", "tls10"),
    ("OpenSSL TLS 1.2", "legacy", "tls12"),
]
BULK_CASES = [("rustls TLS 1.3", "rustls", "tls13"), ("OpenSSL TLS 1.0 AES128-SHA", "legacy", "tls10")]
LIMIT_S = 30  # any one socket operation
LINE_MAX = 64 * 1024


def context(kind, ca):
    """The device's TLS: 'tls13', 'tls12' (at most 1.2, default suites) or
    'tls10' (TLS 1.0 with AES128-SHA only, as old printers offer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if kind == "tls13":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    elif kind == "tls12":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif kind == "tls10":
        ctx.set_ciphers("AES128-SHA:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    else:
        raise ValueError(kind)
    return ctx


def connect(port, ctx):
    raw = socket.create_connection(("127.0.0.1", port), timeout=LIMIT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # close with a reset: thousands of handshakes must not fill the port range with TIME_WAIT
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            if len(self.buf) > LINE_MAX:
                raise ConnectionError("line too long")
            self.fill()

    def fill(self):
        d = self.sock.recv(1 << 20)
        if not d:
            raise ConnectionError("connection closed by the server")
        self.buf += d

    def exactly(self, n):
        while len(self.buf) < n:
            self.fill()
        out = self.buf[:n]
        del self.buf[:n]
        return out


def handshake_worker(port, kind, ca, secs):
    """Handshakes with the greeting read, for `secs`: (ok, errors, first
    error, negotiated version and cipher)."""
    ctx = context(kind, ca)
    ok = errors = 0
    first_error = seen = None
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            s = connect(port, ctx)
            try:
                if not Reader(s).line().startswith(b"* OK"):
                    raise ConnectionError("no greeting")
                if seen is None:
                    seen = f"{s.version()} {s.cipher()[0]}"
            finally:
                s.close()
            ok += 1
        except (OSError, ConnectionError) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"[:160]
    return ok, errors, first_error, seen


def handshakes(pid, port, kind, ca, secs, workers, proc_cpu):
    cpu0, t0 = proc_cpu(pid), time.monotonic()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        rs = pool.starmap(handshake_worker, [(port, kind, ca, secs)] * workers)
    wall, cpu1 = time.monotonic() - t0, proc_cpu(pid)
    return {"ok": sum(r[0] for r in rs), "errors": sum(r[1] for r in rs), "wall_s": wall,
            "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "error_sample": next((r[2] for r in rs if r[2]), None), "negotiated": next((r[3] for r in rs if r[3]), None)}


def imap_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fetches(pid, port, kind, ca, user, password, reps, proc_cpu):
    """One session: LOGIN, SELECT, `reps` x FETCH 1 BODY.PEEK[]; MB/s of each."""
    s = connect(port, context(kind, ca))
    r = Reader(s)
    n = 0

    def command(text):
        nonlocal n
        n += 1
        tag = f"d{n}".encode()
        s.sendall(tag + b" " + text.encode() + b"\r\n")
        size = 0
        while True:
            ln = r.line()
            m = re.search(rb"\{(\d+)\}$", ln)
            if m:
                size += len(r.exactly(int(m.group(1))))
                continue
            if ln.startswith(tag + b" "):
                if not ln.startswith(tag + b" OK"):
                    raise RuntimeError(ln.decode(errors="replace"))
                return size

    try:
        r.line()
        negotiated = f"{s.version()} {s.cipher()[0]}"
        command(f"LOGIN {imap_quote(user)} {imap_quote(password)}")
        command("SELECT INBOX")
        mbps, moved = [], 0
        cpu0 = proc_cpu(pid)
        for _ in range(reps):
            t = time.monotonic()
            got = command("FETCH 1 BODY.PEEK[]")
            mbps.append(got / (time.monotonic() - t) / 1e6)
            moved += got
        cpu1 = proc_cpu(pid)
        command("LOGOUT")
    finally:
        s.close()
    return {"mbps": mbps, "bytes": moved, "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "negotiated": negotiated}


def workload(args, out, procs, N, up, phc, real, ca, oxbridge_config, ports, users, password, proc_cpu, log):
    """Run both parts; the results for report.py (key 'devtls')."""
    tls_dir = os.path.join(up["OXB_UPSTREAM_DIR"], "tls")
    cert, key = os.path.join(tls_dir, "server.crt"), os.path.join(tls_dir, "server.key")
    cfg = os.path.join(out, "oxbridge-devtls.toml")
    oxbridge_config(cfg, os.path.join(out, "state-devtls"), {p: f"localhost:{real[p]}" for p in real}, ca,
                    up["TOKEN_URL"], [], [{"login": u, "password_hash": phc, "grant": "client_credentials"}
                                          for u in users])
    with open(cfg, "a") as f:
        for name, extra in (("rustls", ""), ("legacy", 'tls_min_version = "1.0"\n')):
            f.write(f'[[listener]]\nprotocol = "imap"\nlisten = "127.0.0.1:{ports[name]}"\ntls = "implicit"\n'
                    f'cert_file = "{cert}"\nkey_file = "{key}"\nmax_connections = 60000\n{extra}')
    oxb = procs.start("oxbridge-devtls", [args.oxbridge, "run", "--config", cfg], wait_ports=ports.values())
    res = {"workers": N["devtls_workers"], "secs": N["devtls_secs"], "rounds": N["devtls_rounds"],
           "fetch_size": N["imap_size"], "handshakes": {}, "bulk": {}}
    try:
        for rnd in range(N["devtls_rounds"]):
            for name, listener, kind in CASES:
                log(f"devtls handshakes round {rnd + 1}: {name}, {N['devtls_workers']} workers "
                    f"for {N['devtls_secs']} s")
                x = handshakes(oxb.pid, ports[listener], kind, ca, N["devtls_secs"], N["devtls_workers"], proc_cpu)
                res["handshakes"].setdefault(name, []).append(x)
        reps = -(-N["devtls_fetch_reps"] // N["devtls_rounds"])
        for rnd in range(N["devtls_rounds"]):
            for name, listener, kind in BULK_CASES:
                log(f"devtls bulk round {rnd + 1}: {name}, {reps} x FETCH of {N['imap_size']} bytes")
                try:
                    x = fetches(oxb.pid, ports[listener], kind, ca, users[0], password, reps, proc_cpu)
                except (OSError, ConnectionError, RuntimeError) as e:
                    x = {"failed": f"{type(e).__name__}: {e}"[:200]}
                res["bulk"].setdefault(name, []).append(x)
    finally:
        procs.stop("oxbridge-devtls")
    return res


def summary(res):
    """Per case: handshakes/s (all rounds), min-max of the rounds, CPU ms per
    handshake; per bulk case: MB/s median and min-max, CPU s/GB."""
    hs = {}
    for name, runs in res.get("handshakes", {}).items():
        ok = sum(r["ok"] for r in runs)
        wall = sum(r["wall_s"] for r in runs)
        cpu = None if any(r["cpu_s"] is None for r in runs) else sum(r["cpu_s"] for r in runs)
        rates = [r["ok"] / r["wall_s"] for r in runs if r["wall_s"]]
        hs[name] = {"ok": ok, "errors": sum(r["errors"] for r in runs), "rate": ok / wall if wall else None,
                    "rate_min": min(rates, default=None), "rate_max": max(rates, default=None),
                    "cpu_ms": cpu * 1000 / ok if cpu is not None and ok else None,
                    "negotiated": next((r["negotiated"] for r in runs if r.get("negotiated")), None),
                    "error_sample": next((r["error_sample"] for r in runs if r.get("error_sample")), None)}
    bulk = {}
    for name, runs in res.get("bulk", {}).items():
        good = [r for r in runs if "failed" not in r]
        mbps = [v for r in good for v in r["mbps"]]
        moved = sum(r["bytes"] for r in good)
        cpu = None if any(r["cpu_s"] is None for r in good) else sum(r["cpu_s"] for r in good)
        bulk[name] = {"n": len(mbps), "p50": statistics.median(mbps) if mbps else None,
                      "min": min(mbps, default=None), "max": max(mbps, default=None),
                      "cpu_s_gb": cpu / (moved / 1e9) if cpu is not None and moved else None,
                      "negotiated": next((r["negotiated"] for r in good), None),
                      "failed": next((r["failed"] for r in runs if "failed" in r), None)}
    return hs, bulk
