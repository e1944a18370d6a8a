#!/usr/bin/env python3
"""oxbridge soak: a steady mix of devices for a set time against an instance
of the test upstream of the soak's own, then the accounts: every message
acknowledged with 250 delivered, every error a device saw sorted into
protocol replies and the rest, memory and descriptors over time, upstream
slots and throttle back to zero. Called by bench/soak (see bench/README.md).

Faults hook
-----------
If bench/soak_faults.py exists (or the file given with --faults), the soak
imports it and calls

    soak_faults.schedule(ctx, minutes) -> list of faults

once the load runs. Each fault has `at_s` (seconds after the load starts),
`name`, `start()` and `stop()`; optionally `duration_s`. The soak calls
`start()` at `at_s`, then `stop()` after `duration_s` seconds, or at once
when `start()` returns if the fault has no `duration_s` (its `start()` then
lasts as long as the fault). Every fault still running when the load ends is
stopped before the spool is drained and the messages are counted. Faults
run in threads of their own; an exception in one is logged and recorded.

`ctx` (class Ctx below) gives a fault:

    ctx.upstream_env        dict: the test upstream's upstream.json (ports, state dir, logs)
    ctx.oxbridge_pid()      pid of the oxbridge process now running
    ctx.restart_oxbridge(kill=True)
                            SIGKILL (kill=False: SIGTERM and wait for its drain), then start
                            it again with the same config and state; returns when its
                            listeners accept. Device errors that are not protocol replies
                            between the signal and 5 s after the restart are counted as
                            excused (the kill's own doing), not as failures.
    ctx.reload(config_text) write the config and send SIGHUP
    ctx.config_text()       the config as it is now
    ctx.spool_dir, ctx.state_dir   oxbridge's spool and state directories
    ctx.spool_is_scratch    True when spool_dir is a 64 MB tmpfs of the soak's own (a fault may fill it)
    ctx.admin_url           http://127.0.0.1:PORT of oxbridge's admin endpoint
    ctx.ports               the oxbridge listeners' ports: imap, pop3, smtp_session, smtp_spool, admin
    ctx.oxbridge_bin        the oxbridge binary
    ctx.redis               the Redis both replicas share: start(), stop(), restart() (same port,
                            empty again: no persistence), url, port; None with --no-redis
    ctx.out                 the run's output directory
    ctx.log(msg)            a line in the soak's log, with the time into the run
    ctx.excuse(seconds, why)  count non-protocol device errors of the next `seconds` as excused
"""
import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import soak_clients as cl  # noqa: E402
import soak_senders  # noqa: E402
import soak_report  # noqa: E402
import soak_replicas  # noqa: E402
from soak_measure import fds, held, http, metrics, msum, rss_kib, slots  # noqa: E402

PASSWORD = "soak-device-password"
THROTTLE_QUIET_S = 16 * 60  # oxbridge forgets failed logins 15 minutes after the last
USERS = ["alice@example.test", "bob@example.test"]
PROBES = [f"probe{i}@example.test" for i in range(1, 5)]  # targets of the wrong passwords
GRAPH_LOGIN = "graph-sender@example.test"
SCOPE = "https://outlook.office365.com/.default"
TOKEN_TTL = 60
T0 = time.time()


def log(msg):
    print(f"[soak {time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def free_ports(n):
    """n distinct loopback ports free now, from 20000-27999: below the
    kernel's ephemeral range (so that no client connection of the run takes
    one while a listener is down, e.g. between a kill and a restart) and
    apart from the ports the tests' and bench/run's upstreams use by
    default (28080-29996, 31025-32044, 38080-39996); each is proved free by
    binding it. Port 0 (any free port) if the ephemeral range starts lower."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    ports = []
    for _ in range(50 * n):
        if len(ports) == n:
            return ports
        p = rng.randrange(20000, min(low, 28000)) if low > 21000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            p = s.getsockname()[1]
        if p not in ports:
            ports.append(p)
    raise SystemExit("no free loopback ports")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def toml(s):
    return json.dumps(str(s))


# ---------------------------------------------------------------- the upstream of our own

class Upstream:
    def __init__(self, out, break_postfix):
        self.dir = f"/tmp/oxb-soak-upstream-{os.getpid()}"
        names = ["IDP", "IMAPS", "POP3S", "SUBMISSION", "GRAPH", "EXPIRY_IMAPS", "EXPIRY_POP3S"]
        self.env = dict(os.environ, OXB_UPSTREAM_DIR=self.dir, OXB_EXPIRE_SESSIONS="1")
        self.env.update({f"OXB_{n}_PORT": str(p) for n, p in zip(names, free_ports(len(names)))})
        self.out, self.break_postfix, self.up = out, break_postfix, None

    def start(self):
        log(f"starting the test upstream in {self.dir} "
            f"(ports {', '.join(v for k, v in self.env.items() if k.startswith('OXB_') and k.endswith('_PORT'))})")
        with open(os.path.join(self.out, "upstream-start.log"), "wb") as f:
            r = subprocess.run(["bash", os.path.join(ROOT, "tests/upstream/start"), "--fresh"], env=self.env,
                               stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            sys.stderr.write(open(os.path.join(self.out, "upstream-start.log")).read()[-3000:])
            raise SystemExit("the test upstream did not start")
        self.up = json.load(open(os.path.join(self.dir, "upstream.json")))
        if self.break_postfix:
            log("--break-postfix: stopping Postfix for the whole run")
            subprocess.run(["postfix", "-c", os.path.join(self.dir, "postfix/etc"), "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.up

    def stop(self):
        logs = os.path.join(self.dir, "log")
        if os.path.isdir(logs):
            shutil.copytree(logs, os.path.join(self.out, "upstream-logs"), dirs_exist_ok=True)
        # OXB_UPSTREAM_DIR is ours: never the tests' default instance
        assert self.env["OXB_UPSTREAM_DIR"] == self.dir
        subprocess.run(["bash", os.path.join(ROOT, "tests/upstream/stop"), "--purge"], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def token(self):
        t = json.loads(http(self.up["TOKEN_URL"], {"grant_type": "client_credentials", "client_id": "test-app",
                                                   "client_secret": "test-app-secret", "scope": SCOPE}))
        return t["access_token"]

    def graph_queue(self):
        """Recipients the Graph stand-in has accepted and not yet delivered (0 if it cannot say)."""
        ctx = ssl.create_default_context(cafile=self.up["UPSTREAM_CA"])
        url = f"https://127.0.0.1:{self.up['GRAPH_PORT']}/admin/stats"
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx)).open(url, timeout=5) as r:
                return int(json.load(r).get("queued", 0))
        except (OSError, ValueError):
            return 0

    def postfix_queue(self):
        n = 0
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.dir, "postfix/spool", q)):
                n += len(files)
        return n


# ---------------------------------------------------------------- oxbridge

def make_config(up, state, spool, ports, phc):
    lines = [
        f"state_dir = {toml(state)}",
        "[log]", 'level = "info"', 'format = "json"',
        "[admin]", f'listen = "127.0.0.1:{ports["admin"]}"',
        "[upstream]",
        f'smtp = "localhost:{up["SUBMISSION_PORT"]}"',
        # the Exchange-like front: sessions end when their token expires
        f'imap = "localhost:{up["EXPIRY_IMAPS_PORT"]}"',
        f'pop3 = "localhost:{up["EXPIRY_POP3S_PORT"]}"',
        f"graph = {toml(up['GRAPH_URL'])}",
        f"ca_file = {toml(up['UPSTREAM_CA'])}",
        "[oauth]", 'tenant = "common"', 'client_id = "test-app"', 'client_secret = "test-app-secret"',
        f"token_url = {toml(up['IDP_URL'] + f'/ttl-{TOKEN_TTL}/oauth2/v2.0/token')}",
    ]
    for proto, name, extra in [("imap", "imap", ""), ("pop3", "pop3", ""), ("smtp", "smtp_session", ""),
                               ("smtp", "smtp_spool", 'delivery = "spool"')]:
        lines += ["[[listener]]", f'protocol = "{proto}"', f'listen = "127.0.0.1:{ports[name]}"', 'tls = "none"',
                  "allow_plaintext_auth = true"] + ([extra] if extra else [])
    for u in USERS:
        lines += ["[[account]]", f"login = {toml(u)}", f"password_hash = {toml(phc)}", 'grant = "client_credentials"']
    lines += ["[[account]]", f"login = {toml(GRAPH_LOGIN)}", f"password_hash = {toml(phc)}",
              'grant = "client_credentials"', f"mailbox = {toml(USERS[0])}", 'send = "graph"']
    for p in PROBES:
        lines += ["[[account]]", f"login = {toml(p)}", f"password_hash = {toml(phc)}",
                  'grant = "client_credentials"', f"mailbox = {toml(USERS[1])}"]
    lines += ["[spool]", f"dir = {toml(spool)}", "retry_min_s = 5", "retry_max_s = 30"]
    return "\n".join(lines) + "\n"


class Oxbridge:
    def __init__(self, binary, cfg_path, log_path, ports):
        self.bin, self.cfg, self.logf, self.ports = binary, cfg_path, log_path, ports
        self.p = None
        self.starts = 0

    def start(self):
        f = open(self.logf, "ab")
        self.p = subprocess.Popen([self.bin, "run", "--config", self.cfg], stdin=subprocess.DEVNULL, stdout=f,
                                  stderr=f, preexec_fn=os.setsid)
        self.starts += 1
        deadline = time.time() + 30
        for port in self.ports.values():
            while not port_open(port):
                if self.p.poll() is not None:
                    raise SystemExit(f"oxbridge exited with {self.p.returncode}; see {self.logf}")
                if time.time() > deadline:
                    raise SystemExit(f"oxbridge did not listen on {port} within 30 s; see {self.logf}")
                time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, wait=45):
        if self.p is None or self.p.poll() is not None:
            return
        self.p.send_signal(sig)
        try:
            self.p.wait(wait)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)


class Ctx:
    """What a fault may use; see the module's docstring."""

    def __init__(self, run, up, oxb, ports, spool_dir, state_dir, scratch, binary, out, rec):
        self.upstream_env, self._oxb, self.ports = up, oxb, ports
        self.spool_dir, self.state_dir, self.spool_is_scratch = spool_dir, state_dir, scratch
        self.admin_url = f"http://127.0.0.1:{ports['admin']}"
        self.oxbridge_bin, self.out, self.redis, self._rec, self._run = binary, out, None, rec, run
        self._lock = threading.Lock()

    def oxbridge_pid(self):
        return self._oxb.p.pid

    def log(self, msg):
        log(f"fault: {msg}")
        self._run.events.append({"t": self._rec.now(), "event": str(msg)})

    def excuse(self, seconds, why):
        with self._rec.lock:
            self._rec.excuse.append((time.time(), time.time() + seconds, why))

    def restart_oxbridge(self, kill=True):
        with self._lock:
            window = [time.time(), None, "oxbridge killed and restarted" if kill else "oxbridge restarted"]
            with self._rec.lock:
                self._rec.excuse.append(window)
            self.log(f"{'SIGKILL' if kill else 'SIGTERM'} to oxbridge {self._oxb.p.pid}, then start again")
            self._oxb.stop(signal.SIGKILL if kill else signal.SIGTERM)
            self._oxb.start()
            with self._rec.lock:
                self._rec.excuse.remove(window)
                self._rec.excuse.append((window[0], time.time() + 5, window[2]))
            self.log(f"oxbridge is back as {self._oxb.p.pid}")

    def config_text(self):
        return open(self._oxb.cfg).read()

    def reload(self, config_text):
        with open(self._oxb.cfg + ".tmp", "w") as f:
            f.write(config_text)
        os.replace(self._oxb.cfg + ".tmp", self._oxb.cfg)
        self.log("config written; SIGHUP")
        os.kill(self._oxb.p.pid, signal.SIGHUP)


def run_faults(ctx, minutes, stop, rec, events, path=None):
    path = path or os.path.join(HERE, "soak_faults.py")
    if not os.path.exists(path):
        log(f"no {path}: a run without faults")
        return []
    spec = importlib.util.spec_from_file_location("soak_faults", path)
    soak_faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak_faults)
    faults = soak_faults.schedule(ctx, minutes)
    log(f"faults: {', '.join(f'{f.name} at {f.at_s:.0f} s' for f in faults) or 'none'}")
    state = []

    def one(f, st):
        if stop.wait(max(0.0, rec.t0 + f.at_s - time.time())):
            return
        try:
            events.append({"t": rec.now(), "event": f"fault {f.name}: start"})
            st["started"] = True
            f.start()
            d = getattr(f, "duration_s", None)
            if d:
                stop.wait(d)
        except Exception as e:  # a fault's own failure must not end the run unaccounted
            events.append({"t": rec.now(), "event": f"fault {f.name}: start failed: {e!r}"})
        finally:
            if st.get("started") and not st.get("stopped"):
                st["stopped"] = True
                try:
                    f.stop()
                except Exception as e:
                    events.append({"t": rec.now(), "event": f"fault {f.name}: stop failed: {e!r}"})
                events.append({"t": rec.now(), "event": f"fault {f.name}: stop"})

    for f in faults:
        st = {"fault": f}
        th = threading.Thread(target=one, args=(f, st), name=f"fault-{f.name}", daemon=True)
        st["thread"] = th
        state.append(st)
        th.start()
    return state


# ---------------------------------------------------------------- measuring

def sample(run, label=None):
    pid = run.oxb.p.pid
    m = metrics(run.ctx.admin_url)
    sl = slots(run.ctx.admin_url)
    with run.rec.lock:
        errs = list(run.rec.errors)
    s = {
        "t": run.rec.now(), "label": label, "pid": pid, "rss_kib": rss_kib(pid), "fds": fds(pid),
        "sessions_active": msum(m, "oxbridge_sessions_active"),
        "sessions_total": msum(m, "oxbridge_sessions_total"),
        "slots": None if sl is None else sum(r[2] for r in sl),
        "waiting": None if sl is None else sum(r[3] for r in sl),
        **held(m),
        "throttled": None if m is None else {lab.get("kind", ""): v for lab, v in
                                             m.get("oxbridge_throttled_logins_total", [])},
        "spool_messages": msum(m, "oxbridge_spool_messages"),
        "spool_on_disk": run.spool_depth(),
        "swaps": msum(m, "oxbridge_imap_swaps_total"),
        "swap_refusals": msum(m, "oxbridge_imap_swap_refusals_total"),
        "auth_failures": msum(m, "oxbridge_auth_failures_total"),
        "refusals": msum(m, "oxbridge_refusals_total"),
        "device_errors": len(errs),
        "device_errors_nonprotocol": sum(1 for e in errs if not e["protocol"] and not e["excused"]),
    }
    run.samples.append(s)
    return s


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self, args):
        self.args = args
        self.samples, self.events = [], []
        self.rec = self.oxb = self.ctx = self.up = self.redis = self.replica = None
        self.stop = threading.Event()
        self.scratch, self.spool = False, None

    def spool_depth(self):
        try:
            return len(os.listdir(os.path.join(self.spool, "queue")))
        except OSError:
            return None

    def mount_scratch(self):
        os.makedirs(self.spool, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "soak-spool", self.spool],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log(f"no tmpfs over the spool ({r.stderr.strip()}): spool_is_scratch = False")
            return False
        return True

    def unmount_scratch(self):
        if self.scratch:
            subprocess.run(["umount", self.spool], capture_output=True)

    def main(self):
        a = self.args
        out = a.out
        os.makedirs(out, exist_ok=True)
        minutes = a.minutes
        sample_s = a.sample_s or (10 if minutes <= 5 else 60)
        self.up = Upstream(out, a.break_postfix)
        up = self.up.start()
        try:
            return self.body(up, out, minutes, sample_s)
        finally:
            if self.replica:
                self.replica.stop_now()
            if self.oxb:
                self.oxb.stop()
            if self.redis:
                self.redis.stop()
            self.unmount_scratch()
            self.up.stop()

    def body(self, up, out, minutes, sample_s):
        a = self.args
        ports = dict(zip(["imap", "pop3", "smtp_session", "smtp_spool", "admin"], free_ports(5)))
        state = os.path.join(out, "state")
        self.spool = os.path.join(out, "spool")
        os.makedirs(state, exist_ok=True)
        self.scratch = self.mount_scratch()
        phc = subprocess.run([a.oxbridge_bin, "hash-password"], input=PASSWORD.encode(), capture_output=True,
                             check=True).stdout.decode().strip()
        cfg = os.path.join(out, "oxbridge.toml")
        store = ""
        if not a.no_redis:
            self.redis = soak_replicas.Redis(out, free_ports(1)[0])
            self.redis.start()
            store = self.redis.config()
        with open(cfg, "w") as f:
            f.write(make_config(up, state, self.spool, ports, phc) + store)
        self.oxb = Oxbridge(a.oxbridge_bin, cfg, os.path.join(out, "oxbridge.log"), ports)
        self.oxb.start()
        log(f"oxbridge {a.oxbridge_bin} pid {self.oxb.p.pid}: imap :{ports['imap']} pop3 :{ports['pop3']} "
            f"smtp :{ports['smtp_session']} (session) :{ports['smtp_spool']} (spool), admin :{ports['admin']}; "
            f"{TOKEN_TTL}-s tokens; spool {'on a 64 MB tmpfs' if self.scratch else 'on disk'}; "
            f"{'Redis ' + self.redis.url if self.redis else 'no Redis'}")

        stop = self.stop
        self.rec = rec = cl.Record(time.time())
        self.ctx = Ctx(self, up, self.oxb, ports, self.spool, state, self.scratch, a.oxbridge_bin, out, rec)
        self.ctx.redis = self.redis
        run_id = time.strftime("%H%M%S")
        if self.redis:
            state2 = os.path.join(out, "state-2")
            os.makedirs(state2, exist_ok=True)

            def cfg2(ports2):  # its ports are picked when it starts
                return make_config(up, state2, os.path.join(out, "spool-2"), ports2, phc) + self.redis.config()
            self.replica = soak_replicas.Replica(sys.modules[__name__], self, cfg2, USERS, PASSWORD,
                                                 a.send_every, run_id)
        folders = {u: [f"soak-idle-{u.split('@')[0]}", f"soak-noop-{u.split('@')[0]}"] for u in USERS}
        appenders = [cl.Appender(rec, stop, int(up["IMAPS_PORT"]), up["UPSTREAM_CA"], self.up.token, u,
                                 folders[u], a.append_every) for u in USERS]
        for ap in appenders:
            ap.create()
        devices = []
        for u in USERS:
            n = u.split("@")[0]
            devices.append(cl.ImapDevice(f"imap-idle-{n}", rec, stop, ports["imap"], u, PASSWORD,
                                         folders[u][0], "idle"))
            devices.append(cl.ImapDevice(f"imap-noop-{n}", rec, stop, ports["imap"], u, PASSWORD,
                                         folders[u][1], "noop", every=5))
        imap_devices = list(devices)
        for u in USERS:
            n = u.split("@")[0]
            devices.append(cl.Pop3Poller(f"pop3-{n}", rec, stop, ports["pop3"], u, PASSWORD, 10))
            devices.append(soak_senders.SmtpSender(f"smtp-session-{n}", rec, stop, ports["smtp_session"], "session", u,
                                         PASSWORD, u, [u], a.send_every, run_id))
            devices.append(soak_senders.SmtpSender(f"smtp-spool-{n}", rec, stop, ports["smtp_spool"], "spool", u,
                                         PASSWORD, u, [u], a.send_every, run_id))
        devices.append(soak_senders.SmtpSender("smtp-graph", rec, stop, ports["smtp_session"], "graph", GRAPH_LOGIN,
                                     PASSWORD, USERS[0], USERS, a.send_every * 2, run_id))
        # Failed logins are remembered for 15 minutes: a run long enough stops the wrong
        # passwords THROTTLE_QUIET_S before the end, so that the throttle's entries must be
        # back to 0 when the load stops.
        self.wrong_until = minutes * 60 - THROTTLE_QUIET_S if minutes * 60 >= 2 * THROTTLE_QUIET_S else None
        devices.append(soak_senders.WrongPasswords(rec, stop, ports, PROBES, a.wrong_every, self.wrong_until))

        s0 = sample(self, "start")
        log(f"load: {len(devices)} devices for {minutes} min; sample every {sample_s} s "
            f"(rss {s0['rss_kib']} KiB, fds {s0['fds']})")
        for d in appenders + devices:
            d.start()
        if self.replica:
            self.replica.start()
        faults = run_faults(self.ctx, minutes, stop, rec, self.events, a.faults)
        end = rec.t0 + minutes * 60
        middle_done = False
        while True:
            left = end - time.time()
            if left <= 0:
                break
            time.sleep(min(sample_s, left))
            if time.time() >= end - 0.5:
                break
            label = None
            if not middle_done and time.time() >= rec.t0 + minutes * 30:
                label, middle_done = "middle", True
            s = sample(self, label)
            log(f"rss {s['rss_kib']} KiB, fds {s['fds']}, sessions {s['sessions_active']}, slots {s['slots']}, "
                f"spool {s['spool_on_disk']}, swaps {s['swaps']}, device errors {s['device_errors']} "
                f"({s['device_errors_nonprotocol']} not protocol replies)")
        sample(self, "end of load")
        log("stopping the load")
        stop.set()
        for st in faults:
            st["thread"].join(120)
        if self.replica:
            self.replica.join(120)
        for ap in appenders:
            ap.join(30)
        time.sleep(3)  # Dovecot tells IDLE sessions 0.5 s after a change; the front adds its own
        for d in imap_devices:
            d.done.set()
        for d in devices:
            d.join(60)
        stuck = [d.name for d in devices if d.is_alive()]
        if stuck:
            log(f"devices that did not stop: {stuck}")

        log(f"waiting up to {a.drain_s} s for oxbridge's spool and the Postfix and Graph queues to drain")
        deadline = time.time() + a.drain_s
        while time.time() < deadline and (self.spool_depth() or self.up.postfix_queue() or self.up.graph_queue()):
            time.sleep(1)
        drained = {"spool": self.spool_depth(), "postfix_queue": self.up.postfix_queue(),
                   "graph_queue": self.up.graph_queue()}
        after = self.after_load()
        sweep = self.sweep(up)
        s_end = sample(self, "end")
        result = soak_report.account(self, rec, drained, after, sweep, stuck, faults)
        result["config"] = {"minutes": minutes, "sample_s": sample_s, "token_ttl_s": TOKEN_TTL,
                            "oxbridge_bin": a.oxbridge_bin, "break_postfix": a.break_postfix,
                            "drain_s": a.drain_s, "send_every_s": a.send_every, "append_every_s": a.append_every,
                            "wrong_every_s": a.wrong_every, "spool_is_scratch": self.scratch,
                            "oxbridge_starts": self.oxb.starts, "end_pid": s_end["pid"],
                            "redis": bool(self.redis)}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "soak.svg"), "w") as f:
            f.write(soak_report.svg(self.samples, self.events))
        text = soak_report.table(result)
        with open(os.path.join(out, "report.txt"), "w") as f:
            f.write(text)
        print(text)
        log(f"results in {out} (results.json, report.txt, soak.svg, oxbridge.log)")
        return 0 if result["verdict"]["pass"] else 1

    def after_load(self):
        """Upstream slots and sessions once every device has stopped: must reach 0."""
        deadline = time.time() + 20
        while True:
            sl = slots(self.ctx.admin_url)
            m = metrics(self.ctx.admin_url)
            active = msum(m, "oxbridge_sessions_active")
            h = held(m)
            settled = h["slots_held"] == 0 and h["slots_waiting"] == 0 and h["throttle_checking"] == 0
            if (sl == [] and active == 0 and settled) or time.time() > deadline:
                break
            time.sleep(0.5)
        redis = None
        if self.redis:
            deadline = time.time() + 35  # a killed replica's slots lapse after 30 s
            while True:
                live = self.redis.live_slots()
                if (live is not None and not any(live.values())) or time.time() > deadline:
                    break
                time.sleep(1)
            redis = {"live_slots": live, "throttle_keys": self.redis.throttle_keys(),
                     "replica_2": self.replica.result if self.replica else None}
        return {"slots": sl, "sessions_active": active, "redis": redis, **h, "wrong_until": self.wrong_until,
                "throttled": None if m is None else {lab.get("kind", ""): v for lab, v in
                                                     m.get("oxbridge_throttled_logins_total", [])},
                "metrics": {k: m.get(k) for k in soak_report.COUNTERS} if m else None}

    def sweep(self, up):
        """Every message left in the INBOXes, read straight from Dovecot (POP3S, no DELE)."""
        out = {}
        for u in USERS:
            try:
                p = cl.Pop3(int(up["POP3S_PORT"]), ca=up["UPSTREAM_CA"])
                p.c.send(f"AUTH XOAUTH2 {cl.xoauth2(u, self.up.token())}\r\n".encode())
                p.ok(p.c.line(), "AUTH")
                out[u] = cl.pop3_drain(p, u, self.rec, "sweep", False)
                p.command("QUIT", "QUIT")
            except (cl.ProtoError, cl.WireError, OSError) as e:
                out[u] = f"failed: {e}"
        return out


def main():
    ap = argparse.ArgumentParser(description="oxbridge soak (see bench/README.md)")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--quick", action="store_true", help="2.5 minutes, samples every 10 s")
    ap.add_argument("--oxbridge-bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample-s", type=float, default=None)
    ap.add_argument("--drain-s", type=float, default=120, help="longest wait for the spool to drain at the end")
    ap.add_argument("--send-every", type=float, default=6.0, help="seconds between an SMTP device's messages")
    ap.add_argument("--append-every", type=float, default=2.0, help="seconds between APPENDs per mailbox")
    ap.add_argument("--wrong-every", type=float, default=15.0, help="seconds between wrong-password logins")
    ap.add_argument("--faults", help="a faults module other than bench/soak_faults.py (same interface)")
    ap.add_argument("--no-redis", action="store_true", help="one replica, file store, no second replica")
    ap.add_argument("--break-postfix", action="store_true",
                    help="self-check: Postfix stopped for the whole run (the soak must fail)")
    a = ap.parse_args()
    if a.quick:
        a.minutes = 2.5
    if os.geteuid() != 0:
        raise SystemExit("bench/soak: run as root (the test upstream needs it)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return Run(a).main()
    except SystemExit as e:
        if isinstance(e.code, str):  # a setup failure
            print(f"bench/soak: {e.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
