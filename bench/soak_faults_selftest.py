"""Self-test of bench/soak_faults.py: `python3 bench/soak_faults.py --selftest [--oxbridge-bin PATH]`.

Run as root. Starts a throwaway test upstream of its own (state dir
/tmp/faults-up, free ports through the OXB_*_PORT variables; never the
tests' instance), a redis-server of its own if one is installed, a 16 MiB
tmpfs mounted over the spool dir, and oxbridge (--oxbridge-bin, default
target/release/oxbridge) with a session and a spooling SMTP listener, IMAP
and POP3. Then, for each fault: start(), a look at whether it bites, stop()
(twice: it must be safe to repeat), and a check that the service is back:
an IMAP and a POP3 login, a message through each SMTP listener. At the end
every message the spool acknowledged must be in the mailbox. One PASS/FAIL
line per check; exit status 1 if any failed. Everything it started is
stopped at the end and the upstream's state dir removed.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse

import soak_faults as sf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UP = "/tmp/faults-up"
RUN = "/tmp/faults-run"
PASSWORD = "selftest-password"
T0 = time.time()
RESULTS = []


def say(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Redis:
    def __init__(self, port):
        self.port, self.proc = port, None
        os.makedirs(f"{RUN}/redis", exist_ok=True)
        self.restart()

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def ping(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def stop(self):
        if self.pid():
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", f"{RUN}/redis"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        if not sf.wait_for(self.ping, 10, 0.05):
            raise RuntimeError("redis-server did not answer PING within 10 s")


class Ctx:
    """What bench/soak gives the faults, for a throwaway oxbridge."""

    def __init__(self, up, binary, ports, admin, redis, scratch):
        self.upstream_env, self.oxbridge_bin, self.ports, self.redis = up, binary, ports, redis
        self.admin_url = f"http://127.0.0.1:{admin}"
        self.state_dir, self.spool_dir, self.spool_is_scratch = f"{RUN}/state", f"{RUN}/spool", scratch
        self.cfg, self.proc, self.quick = f"{RUN}/oxbridge.toml", None, False

    def log(self, msg):
        say(msg)

    def config_text(self):
        with open(self.cfg) as f:
            return f.read()

    def write_config(self, text):
        with open(self.cfg + ".tmp", "w") as f:
            f.write(text)
        os.replace(self.cfg + ".tmp", self.cfg)

    def reload(self, text):
        self.write_config(text)
        os.kill(self.oxbridge_pid(), signal.SIGHUP)

    def oxbridge_pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def start_oxbridge(self):
        with open(f"{RUN}/oxbridge.log", "ab") as lf:
            self.proc = subprocess.Popen([self.oxbridge_bin, "run", "--config", self.cfg],
                                         stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                         start_new_session=True)
        for port in list(self.ports.values()) + [int(self.admin_url.rsplit(":", 1)[1])]:
            if not sf.wait_for(lambda: self.proc.poll() is None and sf.port_open(port), 30, 0.05):
                raise RuntimeError(f"oxbridge did not listen on {port}; see {RUN}/oxbridge.log")

    def restart_oxbridge(self, kill=True):
        if self.oxbridge_pid():
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(30)
        self.start_oxbridge()

    def stop_oxbridge(self):
        if self.oxbridge_pid():
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def config(up, ports, admin, phc, redis_port):
    q = sf.json.dumps
    lines = [f"state_dir = {q(RUN + '/state')}", "[log]", 'level = "info"', "[admin]",
             f'listen = "127.0.0.1:{admin}"', "[upstream]",
             f'smtp = "localhost:{up["SUBMISSION_PORT"]}"', f'imap = "localhost:{up["IMAPS_PORT"]}"',
             f'pop3 = "localhost:{up["POP3S_PORT"]}"', f"ca_file = {q(up['UPSTREAM_CA'])}", "[oauth]",
             'tenant = "common"', 'client_id = "test-app"', 'client_secret = "test-app-secret"',
             f"token_url = {q(up['IDP_URL'] + '/ttl-60/oauth2/v2.0/token')}"]
    for name, port in ports.items():
        lines += ["[[listener]]", f'protocol = "{name.split("_")[0]}"', f'listen = "127.0.0.1:{port}"',
                  'tls = "none"', "allow_plaintext_auth = true"]
        if name == "smtp_spool":
            lines.append('delivery = "spool"')
    lines += ["[[account]]", 'login = "alice@example.test"', f"password_hash = {q(phc)}",
              'grant = "client_credentials"',
              "[spool]", f"dir = {q(RUN + '/spool')}", "retry_min_s = 1", "retry_max_s = 5",
              "messages_per_minute = 100000"]
    if redis_port:
        with open(f"{RUN}/store.key", "wb") as f:  # 32 random bytes, the replicas' shared key
            f.write(os.urandom(32))
        os.chmod(f"{RUN}/store.key", 0o600)
        lines += ["[store]", 'backend = "redis"', f'url = "redis://127.0.0.1:{redis_port}"',
                  f"key_file = {q(RUN + '/store.key')}"]
    return "\n".join(lines) + "\n"


def service(ctx, secs=90):
    """Wait until an IMAP and a POP3 login and a message through each SMTP listener work."""
    t0, todo, last, acked = time.time(), ["imap", "pop3", "smtp_session", "smtp_spool"], {}, []
    user = "alice@example.test"
    while todo and time.time() < t0 + secs:
        for what in list(todo):
            try:
                if what == "imap":
                    sf.imap_check(ctx.ports["imap"], user, PASSWORD)
                elif what == "pop3":
                    sf.pop3_check(ctx.ports["pop3"], user, PASSWORD)
                else:
                    mid = sf.smtp_send(ctx.ports[what], user, PASSWORD, user)
                    if what == "smtp_spool":
                        acked.append(mid)
                todo.remove(what)
            except (OSError, sf.Refused, RuntimeError) as e:
                last[what] = f"{e!r}"[:160]
        if todo:
            time.sleep(1)
    return not todo, time.time() - t0, {k: last[k] for k in todo}, acked


def delivered(mids):
    """How many of these Message-IDs are in the upstream's Maildirs."""
    seen = set()
    for root, _, files in os.walk(f"{UP}/mail"):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as fh:
                    head = fh.read(16384)
            except OSError:
                continue
            seen.update(m for m in mids if m.encode() in head)
    return len(seen)


def bites(ctx, name, f, up):
    """What the fault does to the service while it lasts (None: nothing to look at)."""
    user = "alice@example.test"

    def refused(fn):
        try:
            fn()
            return "accepted"
        except sf.Refused as e:
            return f"protocol reply: {e}"
        except OSError as e:
            return f"NOT a protocol reply: {e!r}"
    if name == "postfix-down":
        closed = not sf.port_open(up["SUBMISSION_PORT"])
        r = refused(lambda: sf.smtp_send(ctx.ports["smtp_session"], user, PASSWORD, user))
        return closed and r.startswith("protocol reply: SMTP"), f"submission port closed: {closed}; session SMTP: {r}"
    if name == "dovecot-restart":
        closed = not sf.port_open(up["IMAPS_PORT"])
        r = refused(lambda: sf.imap_check(ctx.ports["imap"], user, PASSWORD))
        return closed and r.startswith("protocol reply"), f"IMAPS port closed: {closed}; IMAP login: {r}"
    if name == "token-endpoint":
        url = up["IDP_URL"] + "/common/oauth2/v2.0/token"
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": "test-app",
                                          "client_secret": "test-app-secret",
                                          "scope": "https://outlook.office365.com/.default"}).encode()

        def status():
            t = time.time()
            try:
                with sf.NO_PROXY.open(url, data=form, timeout=20) as r:
                    return r.status, time.time() - t
            except urllib.error.HTTPError as e:
                return e.code, time.time() - t
        down = status()
        time.sleep(max(0.0, f.started_at + f.duration_s / 2 + 0.5 - time.time()))
        slow = status()
        return down[0] == 503 and slow[0] == 200 and slow[1] >= 1.9, \
            f"down: HTTP {down[0]}; then slow: HTTP {slow[0]} in {slow[1]:.1f} s"
    if name == "spool-disk-full":
        st = os.statvfs(ctx.spool_dir)
        left = st.f_bavail * st.f_frsize
        r = refused(lambda: sf.smtp_send(ctx.ports["smtp_spool"], user, PASSWORD, user, size=256 * 1024))
        return left <= 2 * sf.DISK_RESERVE and r.startswith("protocol reply: SMTP"), \
            f"{left >> 10} KiB left; a 256 KiB message to the spool: {r}"
    if name == "redis-restart":
        return ctx.redis.ping(), f"redis pid now {ctx.redis.pid()}, PING answered"
    return None


def run_faults(ctx, up):
    plan = [("reload-accounts", 3), ("oxbridge-sigkill", 1), ("devices-vanish", 12), ("postfix-down", 8),
            ("dovecot-restart", 5), ("token-endpoint", 8), ("spool-disk-full", 5), ("redis-restart", 1)]
    acked = []
    for name, secs in plan:
        say(f"---- {name}")
        if name == "token-endpoint":
            f = sf.token_endpoint(ctx, 0, secs / 2, secs / 2, delay_ms=2000)
        else:
            f = sf.make(ctx, name, 0, secs)
        f.log = ctx.log
        pid = ctx.oxbridge_pid()
        f.start()
        b = bites(ctx, name, f, up)
        time.sleep(max(0.0, f.started_at + f.duration_s - time.time()))
        f.stop()
        f.stop()  # a second stop must be harmless
        if b is not None:
            check(f"{name} bites", b[0], b[1])
        if name == "oxbridge-sigkill":
            check(f"{name} bites", ctx.oxbridge_pid() not in (None, pid), f"pid {pid} -> {ctx.oxbridge_pid()}")
        if f.notes:
            check(f"{name} notes", not f.error, "; ".join(f.notes))
        check(f"{name} start/stop without error", not f.error and not f.skipped,
              f.error or (f"skipped: {f.skipped}" if f.skipped else ""))
        ok, took, why, mids = service(ctx)
        acked += mids
        check(f"{name} service back", ok, f"IMAP, POP3, SMTP session and spool work after {took:.1f} s"
              if ok else f"still failing after {took:.0f} s: {why}")
        if not ok:  # what comes after would only fail for the same reason
            left = [n for n, _ in plan[plan.index((name, secs)) + 1:]]
            check("faults after it", not left, "not run: " + ", ".join(left))
            return acked
        if name == "devices-vanish":
            cut = " ".join(f.notes)
            kinds = ["mid-DATA session", "mid-DATA spool", "mid-APPEND", "mid-FETCH"]
            check("devices-vanish cut every kind", all(k + " " in cut for k in kinds) and "could not" not in cut,
                  cut)
            ok = sf.wait_for(lambda: sf.metric_sum(ctx, "oxbridge_sessions_active") == 0, 20)
            check("devices-vanish sessions released", ok,
                  f"oxbridge_sessions_active = {sf.metric_sum(ctx, 'oxbridge_sessions_active'):.0f}")
    return acked


def halfway(ctx, up):
    """stop() of a fault whose start() was cut short restores the service all the same."""
    u = sf.Upstream(up)
    fill = os.path.join(ctx.spool_dir, sf.FILL)

    def fill_some():
        with open(fill, "wb") as fh:
            fh.write(b"x" * 4096)
    cases = [("postfix-down", u.postfix_stop, lambda: u.postfix_pid() is not None),
             ("dovecot-restart", u.dovecot_stop, lambda: u.dovecot_pid() is not None),
             ("token-endpoint", lambda: u.idp(token_fail_count=10 ** 9, token_delay_ms=3000),
              lambda: (u.idp()["token_fail_count"], u.idp()["token_delay_ms"]) == (0, 0)),
             ("spool-disk-full", fill_some, lambda: not os.path.exists(fill))]
    for name, half, restored in cases:
        say(f"---- {name}: start() cut halfway, then stop()")
        half()
        f = sf.make(ctx, name, 0, 1)
        f.log = ctx.log
        f.stop()
        ok, took, why, _ = service(ctx)
        check(f"{name} stop() after a start() cut halfway", ok and restored() and not f.error,
              f.error or (f"service back after {took:.1f} s" if ok else f"still failing: {why}"))
        if not ok:
            return


def main():
    args = sys.argv[1:]
    binary = args[args.index("--oxbridge-bin") + 1] if "--oxbridge-bin" in args else \
        os.path.join(ROOT, "target/release/oxbridge")
    if os.getuid() != 0:
        return "the self-test needs root (the test upstream, the tmpfs)"
    if not os.access(binary, os.X_OK):
        return f"no oxbridge binary at {binary}: give --oxbridge-bin PATH"
    binary = os.path.abspath(binary)
    p = free_ports(12)
    env = dict(os.environ, OXB_UPSTREAM_DIR=UP, OXB_IDP_PORT=str(p[0]), OXB_IMAPS_PORT=str(p[1]),
               OXB_POP3S_PORT=str(p[2]), OXB_SUBMISSION_PORT=str(p[3]), OXB_GRAPH_PORT=str(p[4]),
               OXB_EXPIRE_SESSIONS="0", no_proxy="*", NO_PROXY="*")
    ports = {"smtp_session": p[5], "smtp_spool": p[6], "imap": p[7], "pop3": p[8]}
    admin, redis_port = p[9], p[10]
    mounted, ctx, redis = False, None, None
    # SIGTERM (a timeout around the self-test) still runs the clean-up below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    subprocess.run(["umount", f"{RUN}/spool"], stderr=subprocess.DEVNULL)  # left by a run cut short
    subprocess.run(["rm", "-rf", RUN], check=True)
    os.makedirs(f"{RUN}/spool", mode=0o700)
    try:
        say(f"starting a test upstream of our own in {UP}")
        r = subprocess.run(["bash", f"{ROOT}/tests/upstream/start"], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-2000:])
            return "tests/upstream/start failed"
        up = sf.json.load(open(f"{UP}/upstream.json"))
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                                  f"{RUN}/spool"]).returncode == 0
        say(f"spool on a 16 MiB tmpfs: {mounted}")
        if subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True).returncode == 0:
            redis = Redis(redis_port)
        say(f"redis-server of our own: {bool(redis)}")
        phc = subprocess.run([binary, "hash-password"], input=PASSWORD + "\n", capture_output=True,
                             text=True, check=True).stdout.strip()
        ctx = Ctx(up, binary, ports, admin, redis, mounted)
        ctx.write_config(config(up, ports, admin, phc, redis and redis_port))
        ctx.start_oxbridge()

        quick, full = sf.schedule(ctx, 3), sf.schedule(ctx, 60)
        check("schedule --quick", [f.name for f in quick] == ["oxbridge-sigkill", "reload-accounts", "postfix-down"]
              and all(a.at_s + a.duration_s < b.at_s for a, b in zip(quick, quick[1:])) and
              quick[-1].duration_s == 20 and quick[-1].at_s + quick[-1].duration_s < 170,
              ", ".join(f"{f.name} {f.at_s:.0f}+{f.duration_s:.0f}s" for f in quick))
        gaps = [b.at_s - a.at_s for a, b in zip(full, full[1:])]
        check("schedule 60 min", len(full) >= 10 and 200 <= min(gaps) and max(gaps) <= 300 and
              all(a.at_s + a.duration_s < b.at_s for a, b in zip(full, full[1:])),
              f"{len(full)} faults, one every {min(gaps) / 60:.1f} min")

        ok, took, why, acked = service(ctx)
        check("service before the faults", ok, why and str(why))
        acked += run_faults(ctx, up)
        if all(RESULTS):
            halfway(ctx, up)
        ok = sf.wait_for(lambda: sf.metric_sum(ctx, "oxbridge_spool_messages") == 0, 60, 0.5)
        check("spool drained", ok, f"oxbridge_spool_messages = {sf.metric_sum(ctx, 'oxbridge_spool_messages'):.0f}")
        found = delivered(acked)
        check("every message the spool acknowledged was delivered", found == len(acked),
              f"{found} of {len(acked)} found in the upstream's Maildir")
    finally:
        if ctx:
            ctx.stop_oxbridge()
        if redis:
            redis.stop()
        if mounted:
            subprocess.run(["umount", f"{RUN}/spool"])
        subprocess.run(["bash", f"{ROOT}/tests/upstream/stop", "--purge"], env=env, stdin=subprocess.DEVNULL)
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0
