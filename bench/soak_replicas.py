"""Two replicas sharing Redis, for part of the soak: a redis-server of the
soak's own (free loopback port, its own directory, no persistence), the
main oxbridge on it for the whole run, and a second oxbridge with the same
accounts on ports of its own from a quarter to three quarters of the load,
with a few devices of its own."""
import os
import subprocess
import threading
import time

import soak_clients as cl
import soak_senders
from soak_measure import fds, held, metrics, msum, rss_kib, slots


class Redis:
    """ctx.redis: start(), stop(), restart() (same port, empty: no persistence), url, port."""

    def __init__(self, out, port):
        self.port, self.dir = port, os.path.join(out, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.key_file = os.path.join(out, "store.key")
        with open(self.key_file, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(self.key_file, 0o600)
        self.url = f"redis://127.0.0.1:{port}"
        self.p = None
        self.lock = threading.Lock()

    def config(self):
        return f'[store]\nbackend = "redis"\nurl = "{self.url}"\nkey_file = "{self.key_file}"\n'

    def start(self):
        with self.lock:
            log = open(os.path.join(self.dir, "redis.log"), "ab")
            self.p = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", self.dir],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            deadline = time.time() + 10
            while self.cli("PING") != "PONG":
                if time.time() > deadline or self.p.poll() is not None:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)

    def stop(self):
        with self.lock:
            if self.p and self.p.poll() is None:
                self.p.kill()
                self.p.wait(10)

    def restart(self):
        self.stop()
        self.start()

    def cli(self, *args):
        try:
            r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.strip()

    def live_slots(self):
        """{key: members whose lease has not run out} of oxbridge:slots:*."""
        t = self.cli("TIME").split()
        if len(t) < 2:
            return None
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        out = {}
        for key in self.cli("--scan", "--pattern", "oxbridge:slots:*").split():
            n = self.cli("ZCOUNT", key, f"({now_ms}", "+inf")
            out[key] = int(n) if n.isdigit() else n
        return out

    def throttle_keys(self):
        return {k: len(self.cli("--scan", "--pattern", f"oxbridge:{k}:*").split()) for k in ("fail", "lock")}


class Replica(threading.Thread):
    """The second replica: started at `at` s into the load, stopped (SIGTERM) at `until` s,
    after its own devices have stopped and its slots were read."""

    def __init__(self, soak, run, make_cfg, users, password, send_every, run_id):
        super().__init__(name="replica-2", daemon=True)
        self.soak, self.run_, self.make_cfg, self.ports = soak, run, make_cfg, None
        self.users, self.password, self.send_every, self.run_id = users, password, send_every, run_id
        self.result = {"ports": None, "started": None, "stopped": None, "slots_after": None,
                       "sessions_active_after": None}
        self.oxb = None

    def run(self):
        soak, r = self.soak, self.run_
        rec, stop = r.rec, r.stop
        minutes = r.args.minutes
        at, until = minutes * 60 * 0.25, minutes * 60 * 0.75
        if stop.wait(max(0, rec.t0 + at - time.time())):
            return
        self.ports = dict(zip(["imap", "pop3", "smtp_session", "smtp_spool", "admin"], soak.free_ports(5)))
        self.result["ports"] = self.ports
        cfg = os.path.join(r.args.out, "oxbridge-2.toml")
        with open(cfg, "w") as f:
            f.write(self.make_cfg(self.ports))
        self.oxb = soak.Oxbridge(r.args.oxbridge_bin, cfg, os.path.join(r.args.out, "oxbridge-2.log"), self.ports)
        try:
            self.oxb.start()
        except SystemExit as e:
            self.result["error"] = str(e)
            r.events.append({"t": rec.now(), "event": f"replica 2 did not start: {e}"})
            return
        self.result["started"] = rec.now()
        r.events.append({"t": rec.now(), "event": "replica 2 up"})
        soak.log(f"replica 2 (same Redis) pid {self.oxb.p.pid}: imap :{self.ports['imap']} "
                 f"pop3 :{self.ports['pop3']} smtp :{self.ports['smtp_session']}")
        mine = threading.Event()
        a, b = self.users
        devs = [soak_senders.SmtpSender("smtp-session-r2-" + b.split("@")[0], rec, mine, self.ports["smtp_session"],
                              "session-r2", b, self.password, b, [b], self.send_every, self.run_id),
                cl.Pop3Poller("pop3-r2-" + a.split("@")[0], rec, mine, self.ports["pop3"], a, self.password, 10)]
        for d in devs:
            d.start()
        stop.wait(max(0, rec.t0 + until - time.time()))
        mine.set()
        for d in devs:
            d.join(60)
        admin = f"http://127.0.0.1:{self.ports['admin']}"
        deadline = time.time() + 20
        while True:
            sl = slots(admin)
            m = metrics(admin)
            active = msum(m, "oxbridge_sessions_active")
            h = held(m)
            if (sl == [] and active == 0 and h["slots_held"] == 0) or time.time() > deadline:
                break
            time.sleep(0.5)
        self.result.update(slots_after=sl, sessions_active_after=active, held_after=h,
                           rss_kib=rss_kib(self.oxb.p.pid), fds=fds(self.oxb.p.pid))
        self.oxb.stop()
        self.result["stopped"] = rec.now()
        r.events.append({"t": rec.now(), "event": "replica 2 stopped"})
        soak.log(f"replica 2 stopped; its slots after its devices stopped: {sl!r}")

    def stop_now(self):
        if self.oxb:
            self.oxb.stop()
