#!/usr/bin/env python3
"""The soak's faults: what goes wrong during a soak run, when, and how it is undone.

bench/soak imports this module and calls

    schedule(ctx, minutes) -> [Fault]

once, before the load starts. Each Fault has `at_s` (seconds after the load
starts), `name`, `duration_s`, `start()` and `stop()`. The runner calls
`start()` at `at_s` and `stop()` `duration_s` later; `run()` does both (with
the sleep between) for a runner that gives each fault a thread of its own.
Neither raises: an error is logged through ctx.log and kept in `error`.
`stop()` always restores the service, also after a `start()` that failed
halfway, and may be called more than once. `record()` is what to put in
results.json (times, notes, error, skipped). `resets_devices` is true for a
fault after which devices connected to oxbridge may see their connection
reset (the SIGKILL); `started_at` and `stopped_at` (epoch seconds) bound it.

The faults (a 60-minute run has all eleven below, one every 4 minutes, between
the first 10% and the last 15% of the run, the SIGKILL first so that one
oxbridge process lives through the rest; a shorter run the most telling few;
`--quick` or 5 minutes and less: one SIGKILL, a reload, Postfix down 20 s):

  postfix-down        Postfix stopped (`postfix stop`), started again 60-120 s later
  dovecot-restart     Dovecot's master stopped (every IMAP/POP3 session and LMTP
                      delivery ends), started again after 15 s
  token-endpoint      the identity provider's token endpoint answers 503
                      temporarily_unavailable for 60 s (the IDP's token_fail_count
                      hook; the IDP itself stays up, so the upstream still validates
                      tokens, as Exchange does while Entra's token endpoint is out),
                      then every token request takes 4 s for 60 s (token_delay_ms;
                      oxbridge's own limit is 10 s)
  redis-restart       ctx.redis.restart(); skipped when ctx.redis is None
  spool-disk-full     the spool's file system filled up to 64 KiB with one file,
                      removed at stop; only when ctx.spool_is_scratch and the spool
                      dir is a tmpfs mount point of at most 256 MiB, else skipped
  reload-accounts     SIGHUP (ctx.reload) adding an [[account]] (a new login, an
                      Argon2 hash from `oxbridge hash-password`), proven by an IMAP
                      login; at stop a second reload removes it, proven by a refusal
  oxbridge-sigkill    ctx.restart_oxbridge(kill=True)
  devices-vanish      devices that log in, then reset the connection (SO_LINGER 0)
                      mid-DATA (session and spool listeners), mid-APPEND literal
                      and mid-FETCH response, every 5 s while the fault lasts; at
                      stop the upstream's Maildirs and Dovecot's delivery log are
                      searched for those messages (there must be none)

ctx: upstream_env (the upstream's upstream.json keys), oxbridge_pid(),
restart_oxbridge(kill=True), reload(config_text), config_text(), spool_dir,
state_dir, admin_url, log(msg), ports (smtp_session, smtp_spool, imap, pop3),
oxbridge_bin, redis, spool_is_scratch, and optionally quick. Device listeners
are expected to be `tls = "none"` or `"starttls"` (STARTTLS is used when
offered; certificates are not checked).

`python3 bench/soak_faults.py --selftest` (root) proves each fault on a
throwaway upstream and oxbridge of its own (bench/soak_faults_selftest.py).
"""
import base64
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
import uuid

MAX_LINE = 64 * 1024
IO_TIMEOUT = 15
DISK_RESERVE = 64 * 1024
SCRATCH_MAX = 256 << 20
FILL = "soak-disk-full.fill"
VANISH_EVERY_S = 5
FAULT_PASSWORD = "soak-fault-password"
LITERAL = re.compile(r"\{(\d+)\+?\}$")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Fault:
    """One fault: start() at at_s seconds into the run, stop() duration_s later."""

    def __init__(self, at_s, name, start, stop, duration_s=0.0, resets_devices=False, log=print):
        self.log = log
        self.at_s, self.name, self.duration_s = float(at_s), name, float(duration_s)
        self._start, self._stop = start, stop
        self.resets_devices = resets_devices
        self.started_at = self.stopped_at = None
        self.error = None
        self.skipped = None
        self.notes = []

    def _call(self, what, fn, log):
        try:
            fn()
        except Exception as e:  # a fault must never take the runner down
            self.error = (self.error + "; " if self.error else "") + f"{what}: {e!r}"
            log(f"fault {self.name}: {what} FAILED: {e!r}")

    def start(self):
        self.started_at = time.time()
        self._call("start", self._start, self.log)

    def stop(self):
        self._call("stop", self._stop, self.log)
        self.stopped_at = time.time()

    def run(self, sleep=time.sleep):
        try:
            self.start()
            sleep(self.duration_s)
        finally:
            self.stop()

    def record(self):
        return {"name": self.name, "at_s": self.at_s, "duration_s": self.duration_s,
                "started_at": self.started_at, "stopped_at": self.stopped_at,
                "resets_devices": self.resets_devices, "skipped": self.skipped,
                "error": self.error, "notes": self.notes}


# ------------------------------------------------------------------ small helpers
def wait_for(pred, secs, step=0.2):
    end = time.time() + secs
    while True:
        try:
            if pred():
                return True
        except Exception:
            pass
        if time.time() > end:
            return False
        time.sleep(step)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


def http_json(url, body=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with NO_PROXY.open(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def ours(pidfile, mark):
    """The pid in pidfile if that process is alive and mentions mark (never a recycled pid)."""
    try:
        pid = int(open(pidfile).read().strip())
        for f in ("cmdline", "environ"):
            if mark.encode() in open(f"/proc/{pid}/{f}", "rb").read():
                return pid
    except (OSError, ValueError):
        pass
    return None


def alive(pid):
    try:
        return pid is not None and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def metric_sum(ctx, name, label=""):
    """Sum of one metric's samples (with label, e.g. 'result="ok"', in them) from /metrics."""
    url = ctx.admin_url.rstrip("/")
    url = url if url.endswith("/metrics") else url + "/metrics"
    with NO_PROXY.open(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {" and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def daemon(argv, logfile):
    """Run a self-daemonising command (postfix start, dovecot) with none of our descriptors."""
    with open(logfile, "ab") as lf:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, close_fds=True,
                           start_new_session=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}; see {logfile}")


# ------------------------------------------------------------------ hand-driven devices
class Refused(Exception):
    """A protocol reply that was not the one wanted (a 4xx/5xx, NO/BAD, -ERR)."""


class Dev:
    """A device connection driven by hand: bounded lines, a timeout on every read."""

    def __init__(self, port, timeout=IO_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", int(port)), timeout=timeout)
        self.buf = b""

    def line(self):
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise RuntimeError("a line over 64 KiB")
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("connection closed")
            self.buf += d
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def read(self, n):
        while len(self.buf) < n:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("connection closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode() + b"\r\n")

    def starttls(self):
        c = ssl.create_default_context()
        c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
        self.sock, self.buf = c.wrap_socket(self.sock, server_hostname="localhost"), b""

    def vanish(self):
        """Gone without a goodbye: the kernel sends RST (SO_LINGER 0), TLS sends no close_notify."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def smtp_reply(d, want, cmd=None, what=None):
    """Send cmd (if any), read the reply; Refused unless its code starts with want."""
    if cmd is not None:
        d.send(cmd)
    lines = [d.line()]
    while len(lines[-1]) > 3 and lines[-1][3] == "-":
        lines.append(d.line())
    if not lines[-1][:1].isdigit() or int(lines[-1][0]) != want:
        raise Refused(f"SMTP {what or (cmd.split(' ')[0] if cmd else 'greeting')}: {lines[-1][:120]}")
    return lines


def smtp_login(port, login, password):
    d = Dev(port)
    try:
        smtp_reply(d, 2)
        caps = " ".join(smtp_reply(d, 2, "EHLO soak-faults")).upper()
        if "STARTTLS" in caps and "AUTH" not in caps:
            smtp_reply(d, 2, "STARTTLS")
            d.starttls()
            smtp_reply(d, 2, "EHLO soak-faults")
        plain = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        smtp_reply(d, 2, "AUTH PLAIN " + plain)
        return d
    except BaseException:
        d.close()
        raise


def message(mailbox, mid, size):
    head = (f"From: <{mailbox}>\r\nTo: <{mailbox}>\r\nSubject: soak fault {mid}\r\n"
            f"Message-ID: <{mid}@soak.invalid>\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            "\r\n").encode()
    body = b"".join(b"%06d the soak's faults, a line of text to make the message long enough\r\n" % i
                    for i in range(max(1, size // 80)))
    return head + body


def smtp_send(port, login, password, mailbox, size=2000):
    """Send one message; its Message-ID on 250, Refused on any other protocol reply."""
    mid = "soak-fault-check-" + uuid.uuid4().hex
    d = smtp_login(port, login, password)
    try:
        smtp_reply(d, 2, f"MAIL FROM:<{mailbox}>")
        smtp_reply(d, 2, f"RCPT TO:<{mailbox}>")
        smtp_reply(d, 3, "DATA")
        d.send(message(mailbox, mid, size) + b".\r\n")
        smtp_reply(d, 2, what="end of DATA")
        smtp_reply(d, 2, "QUIT")
        return mid
    finally:
        d.close()


def imap_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_cmd(d, tag, text, want="OK"):
    """Send a command; the untagged lines (server literals read whole) and the tagged line."""
    d.send(f"{tag} {text}")
    lines = []
    while True:
        line = d.line()
        m = LITERAL.search(line)
        while m:  # a server literal: read it whole, then the rest of the line
            line = line[:m.start()] + "<%d bytes>" % len(d.read(int(m.group(1)))) + d.line()
            m = LITERAL.search(line)
        if line.startswith(tag + " "):
            if line.split(" ")[1].upper() != want:
                raise Refused(f"IMAP {text.split(' ')[0]}: {line[:120]}")
            return lines, line
        lines.append(line)


def imap_login(port, login, password):
    d = Dev(port)
    try:
        if not d.line().startswith("* OK"):
            raise Refused("IMAP greeting is not * OK")
        caps, _ = imap_cmd(d, "a0", "CAPABILITY")
        caps = " ".join(caps).upper()
        if "LOGINDISABLED" in caps and "STARTTLS" in caps:
            imap_cmd(d, "a1", "STARTTLS")
            d.starttls()
        imap_cmd(d, "a2", f"LOGIN {imap_quote(login)} {imap_quote(password)}")
        return d
    except BaseException:
        d.close()
        raise


def imap_check(port, login, password):
    d = imap_login(port, login, password)
    try:
        imap_cmd(d, "c1", "SELECT INBOX")
        imap_cmd(d, "c2", "LOGOUT")
    finally:
        d.close()


def pop3_check(port, login, password):
    d = Dev(port)
    try:
        for cmd in (None, f"USER {login}", f"PASS {password}", "STAT", "QUIT"):
            if cmd:
                d.send(cmd)
            line = d.line()
            if not line.startswith("+OK"):
                raise Refused(f"POP3 {(cmd or 'greeting').split(' ')[0]}: {line[:120]}")
    finally:
        d.close()


# ------------------------------------------------------------------ the upstream's daemons
class Upstream:
    def __init__(self, env):
        self.env = env
        self.dir = env["OXB_UPSTREAM_DIR"].rstrip("/")
        self.postfix_etc = f"{self.dir}/postfix/etc"
        self.dovecot_conf = f"{self.dir}/dovecot/dovecot.conf"

    def postfix_pid(self):
        return ours(f"{self.dir}/postfix/spool/pid/master.pid", self.postfix_etc)

    def dovecot_pid(self):
        return ours(f"{self.dir}/dovecot/run/master.pid", self.dovecot_conf)

    def postfix_stop(self):
        pid = self.postfix_pid()
        if pid:
            daemon(["postfix", "-c", self.postfix_etc, "stop"], self.env["POSTFIX_LOG"])
            if not wait_for(lambda: not alive(pid), 15):
                os.kill(pid, 9)
        if not wait_for(lambda: not port_open(self.env["SUBMISSION_PORT"]), 5):
            # an smtpd still serving a session keeps the listening socket: this instance's
            # daemons are the processes whose working directory is its queue directory
            for p in in_dir(f"{self.dir}/postfix/spool"):
                os.kill(p, 9)
        if not wait_for(lambda: not port_open(self.env["SUBMISSION_PORT"]), 10):
            raise RuntimeError("the submission port is still open after postfix stop")

    def postfix_start(self):
        """Start Postfix unless it runs; wait for its greeting. True if it was down."""
        down = not self.postfix_pid()
        if down:
            if os.path.isdir(f"{self.dir}/postfix/spool/active"):
                open(f"{self.dir}/postfix/spool/quick-start", "a").close()
            daemon(["postfix", "-c", self.postfix_etc, "start"], self.env["POSTFIX_LOG"])
        if not wait_for(lambda: greeting(self.env["SUBMISSION_PORT"], False, "220 "), 30):
            raise RuntimeError("postfix did not greet within 30 s")
        return down

    def dovecot_stop(self):
        pid = self.dovecot_pid()
        if pid:
            os.kill(pid, 15)
            if not wait_for(lambda: not alive(pid), 10):
                os.kill(pid, 9)
                wait_for(lambda: not alive(pid), 5)
        if not wait_for(lambda: not port_open(self.env["IMAPS_PORT"]), 10):
            raise RuntimeError("the IMAPS port is still open after stopping dovecot")

    def dovecot_start(self):
        """Start Dovecot unless it runs; wait for its greetings. True if it was down."""
        down = not self.dovecot_pid()
        if down:
            # as tests/upstream/start does: stale sockets in base_dir slow dovecot's auth down
            subprocess.run(["rm", "-rf", f"{self.dir}/dovecot/run"], check=True)
            daemon(["dovecot", "-c", self.dovecot_conf], self.env["DOVECOT_LOG"])
        for port in (self.env["IMAPS_PORT"], self.env["POP3S_PORT"]):
            if not wait_for(lambda: greeting(port, True, ("* OK", "+OK")), 30):
                raise RuntimeError(f"dovecot did not greet on {port} within 30 s")
        return down

    def idp(self, **knobs):
        """The IDP's runtime knobs: set these (none: just read them)."""
        return http_json(self.env["IDP_URL"] + "/admin/config", knobs or None)


def in_dir(path):
    """Pids of the processes whose working directory is path."""
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.readlink(f"/proc/{p}/cwd") == os.path.realpath(path):
                out.append(int(p))
        except OSError:
            pass
    return out


def greeting(port, tls, want):
    d = Dev(port, timeout=3)
    try:
        if tls:
            d.starttls()
        return d.line().startswith(want)
    finally:
        d.close()


# ------------------------------------------------------------------ accounts added by reload
class Accounts:
    """[[account]] blocks this module adds with a reload and takes out again."""

    def __init__(self, ctx):
        self.ctx = ctx
        users = ctx.upstream_env.get("UPSTREAM_USERS") or "alice@example.test:"
        self.mailbox = users.split()[0].split(":")[0]

    def block(self, login):
        r = subprocess.run([self.ctx.oxbridge_bin, "hash-password"], input=FAULT_PASSWORD + "\n",
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not r.stdout.strip().startswith("$argon2"):
            raise RuntimeError(f"oxbridge hash-password exited {r.returncode}")
        return (f"\n# added by the soak's fault {login}\n[[account]]\nlogin = {json.dumps(login)}\n"
                f"password_hash = {json.dumps(r.stdout.strip())}\ngrant = \"client_credentials\"\n"
                f"mailbox = {json.dumps(self.mailbox)}\n")

    def reload(self, text, what):
        """ctx.reload(text), then wait for oxbridge_config_reloads_total to count it."""
        try:
            before = (metric_sum(self.ctx, "oxbridge_config_reloads_total", 'result="ok"'),
                      metric_sum(self.ctx, "oxbridge_config_reloads_total", 'result="failed"'))
        except OSError:
            before = None
        self.ctx.reload(text)
        if before is None:
            time.sleep(1)
            return
        counts = []

        def counted():
            counts[:] = [metric_sum(self.ctx, "oxbridge_config_reloads_total", 'result="ok"'),
                         metric_sum(self.ctx, "oxbridge_config_reloads_total", 'result="failed"')]
            return counts[0] > before[0] or counts[1] > before[1]
        if not wait_for(counted, 15):
            raise RuntimeError(f"reload ({what}) not counted in /metrics within 15 s")
        if counts[1] > before[1]:
            raise RuntimeError(f"reload ({what}) failed: oxbridge kept its running configuration")

    def add(self, login):
        block = self.block(login)
        self.reload(self.ctx.config_text().rstrip("\n") + "\n" + block, f"add {login}")
        return block

    def remove(self, block):
        text = self.ctx.config_text()
        if block in text:
            self.reload(text.replace(block, "\n"), "remove an account")


def device_port(ctx, *names):
    for n in names:
        if ctx.ports.get(n):
            return ctx.ports[n]
    return None


# ------------------------------------------------------------------ the faults
def postfix_down(ctx, at, secs):
    up = Upstream(ctx.upstream_env)

    def start():
        up.postfix_stop()
        ctx.log(f"fault postfix-down: Postfix stopped for {secs:.0f} s")

    def stop():
        if up.postfix_start():
            ctx.log("fault postfix-down: Postfix started again, greeting")
    return Fault(at, "postfix-down", start, stop, secs)


def dovecot_restart(ctx, at, secs):
    up = Upstream(ctx.upstream_env)

    def start():
        up.dovecot_stop()
        ctx.log(f"fault dovecot-restart: Dovecot stopped (IMAP/POP3 sessions and LMTP end) for {secs:.0f} s")

    def stop():
        if up.dovecot_start():
            ctx.log("fault dovecot-restart: Dovecot started again, IMAPS and POP3S greeting")
    return Fault(at, "dovecot-restart", start, stop, secs)


def token_endpoint(ctx, at, down_s, slow_s, delay_ms=4000):
    up = Upstream(ctx.upstream_env)
    timer, saved = [], {}

    def slow():
        up.idp(token_fail_count=0, token_delay_ms=delay_ms)
        ctx.log(f"fault token-endpoint: token endpoint back but slow: {delay_ms} ms per request "
                f"for {slow_s:.0f} s")

    def start():
        before = up.idp()
        saved.update({k: before[k] for k in ("token_fail_count", "token_fail_status", "token_fail_error",
                                             "token_delay_ms")})
        up.idp(token_fail_count=10 ** 9, token_fail_status=503, token_fail_error="temporarily_unavailable")
        ctx.log(f"fault token-endpoint: token endpoint answers 503 for {down_s:.0f} s")
        t = threading.Timer(down_s, lambda: f._call("slow", slow, ctx.log))
        t.daemon = True
        timer.append(t)
        t.start()

    def stop():
        for t in timer:
            t.cancel()
        now = up.idp()
        want = saved or {"token_fail_count": 0, "token_delay_ms": 0}
        if any(now.get(k) != v for k, v in want.items()):
            up.idp(**want)
            ctx.log("fault token-endpoint: token endpoint normal again")
    f = Fault(at, "token-endpoint", start, stop, down_s + slow_s)
    return f


def redis_restart(ctx, at, secs):
    pending = []

    def start():
        r = getattr(ctx, "redis", None)
        if r is None:
            f.skipped = "the run uses no Redis now (ctx.redis is None)"
            ctx.log("fault redis-restart: skipped: " + f.skipped)
            return
        pending.append(r)
        r.restart()
        pending.clear()
        ctx.log("fault redis-restart: Redis restarted")

    def stop():
        for r in pending:  # start() failed halfway: try once more
            r.restart()
            ctx.log("fault redis-restart: Redis restarted again at stop")
        pending.clear()
    f = Fault(at, "redis-restart", start, stop, secs)
    return f


def scratch_mount(path):
    """(mount point, fstype) of the mount that holds path."""
    best = ("/", "")
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as m:
        for line in m:
            parts = line.split()
            mnt, fstype = parts[4].replace("\\040", " "), parts[parts.index("-") + 1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best


def spool_disk_full(ctx, at, secs):
    def start():
        fill = os.path.join(str(ctx.spool_dir), FILL)
        mnt, fstype = scratch_mount(ctx.spool_dir)
        st = os.statvfs(ctx.spool_dir)
        size = st.f_blocks * st.f_frsize
        if not getattr(ctx, "spool_is_scratch", False) or fstype != "tmpfs" or \
                mnt != os.path.realpath(ctx.spool_dir) or size > SCRATCH_MAX:
            f.skipped = (f"the spool dir is not a scratch tmpfs of its own (spool_is_scratch="
                         f"{getattr(ctx, 'spool_is_scratch', False)}, mount {mnt} {fstype or '?'}, "
                         f"{size >> 20} MiB)")
            ctx.log("fault spool-disk-full: skipped: " + f.skipped)
            return
        free = st.f_bavail * st.f_frsize
        fd = os.open(fill, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(0, free - DISK_RESERVE))
        finally:
            os.close(fd)
        st = os.statvfs(ctx.spool_dir)
        ctx.log(f"fault spool-disk-full: spool file system filled, {st.f_bavail * st.f_frsize >> 10} KiB "
                f"left, for {secs:.0f} s")

    def stop():
        fill = os.path.join(str(ctx.spool_dir), FILL)
        if os.path.exists(fill):
            os.unlink(fill)
            ctx.log("fault spool-disk-full: fill file removed")
    f = Fault(at, "spool-disk-full", start, stop, secs)
    return f


def reload_accounts(ctx, at, secs):
    state = {}

    def start():
        acc = Accounts(ctx)
        login = f"soak-fault-reload-{uuid.uuid4().hex[:8]}@example.test"
        state["acc"], state["login"] = acc, login
        state["block"] = acc.add(login)
        imap_check(device_port(ctx, "imap"), login, FAULT_PASSWORD)
        f.notes.append(f"added {login}: IMAP login works")
        ctx.log(f"fault reload-accounts: SIGHUP added account {login}; its IMAP login works")

    def stop():
        if "block" not in state:
            return
        state["acc"].remove(state.pop("block"))
        try:
            imap_check(device_port(ctx, "imap"), state["login"], FAULT_PASSWORD)
            raise RuntimeError(f"removed account {state['login']} can still log in")
        except Refused as e:
            f.notes.append(f"removed {state['login']}: login refused ({e})")
        ctx.log(f"fault reload-accounts: SIGHUP removed account {state['login']}; its login is refused")
    f = Fault(at, "reload-accounts", start, stop, secs)
    return f


def oxbridge_sigkill(ctx, at, secs):
    def start():
        old = ctx.oxbridge_pid()
        ctx.restart_oxbridge(kill=True)
        f.notes.append(f"pid {old} killed, now {ctx.oxbridge_pid()}")
        ctx.log(f"fault oxbridge-sigkill: SIGKILL to pid {old}, restarted as {ctx.oxbridge_pid()}")

    def stop():
        if not alive(ctx.oxbridge_pid()):
            ctx.restart_oxbridge(kill=True)
            ctx.log(f"fault oxbridge-sigkill: oxbridge was not running; restarted as {ctx.oxbridge_pid()}")
    f = Fault(at, "oxbridge-sigkill", start, stop, secs, resets_devices=True)
    return f


def vanish_round(ctx, login, mids, counts):
    """One device of each kind logs in, gets half way, and resets the connection."""
    mailbox = counts["mailbox"]

    def mid_data(name, port):
        mid = "soak-fault-vanish-" + uuid.uuid4().hex
        msg = message(mailbox, mid, 64 * 1024)
        d = smtp_login(port, login, FAULT_PASSWORD)
        try:
            smtp_reply(d, 2, f"MAIL FROM:<{mailbox}>")
            smtp_reply(d, 2, f"RCPT TO:<{mailbox}>")
            smtp_reply(d, 3, "DATA")
            mids.append(mid)
            d.send(msg[:len(msg) // 2])
            time.sleep(0.2)
        finally:
            d.vanish()
        counts[name] = counts.get(name, 0) + 1

    def mid_append(port):
        mid = "soak-fault-vanish-" + uuid.uuid4().hex
        msg = message(mailbox, mid, 64 * 1024)
        d = imap_login(port, login, FAULT_PASSWORD)
        try:
            d.send(f"v1 APPEND INBOX {{{len(msg)}}}")
            if not d.line().startswith("+"):
                raise Refused("APPEND literal not accepted")
            mids.append(mid)
            d.send(msg[:len(msg) // 2])
            time.sleep(0.2)
        finally:
            d.vanish()
        counts["mid-APPEND"] = counts.get("mid-APPEND", 0) + 1

    def mid_fetch(port):
        d = imap_login(port, login, FAULT_PASSWORD)
        try:
            lines, _ = imap_cmd(d, "v1", "EXAMINE INBOX")
            exists = max([int(x.split()[1]) for x in lines if x.endswith(" EXISTS")] or [0])
            if exists:
                d.send("v2 FETCH 1:* BODY.PEEK[]")
                d.line()
                counts["mid-FETCH"] = counts.get("mid-FETCH", 0) + 1
        finally:
            d.vanish()

    for what, fn in (("mid-DATA session", lambda: mid_data("mid-DATA session", ctx.ports["smtp_session"])),
                     ("mid-DATA spool", lambda: mid_data("mid-DATA spool", ctx.ports["smtp_spool"])),
                     ("mid-APPEND", lambda: mid_append(device_port(ctx, "imap"))),
                     ("mid-FETCH", lambda: mid_fetch(device_port(ctx, "imap")))):
        try:
            if what.startswith("mid-DATA") and not ctx.ports.get(what.replace("mid-DATA ", "smtp_")):
                continue
            fn()
        except Exception as e:  # a device that could not get half way is noted, not fatal
            counts.setdefault("failed", []).append(f"{what}: {e!r}")


def maildir_hits(updir, needles, since):
    """How many messages in the upstream's Maildirs, written since `since`, hold one of needles."""
    hits = 0
    for root, _, files in os.walk(os.path.join(updir, "mail")):
        if os.path.basename(root) not in ("new", "cur", "tmp"):
            continue
        for name in files:
            p = os.path.join(root, name)
            try:
                if os.stat(p).st_mtime < since:
                    continue
                with open(p, "rb") as fh:
                    head = fh.read(16384)
            except OSError:
                continue
            hits += any(n.encode() in head for n in needles)
    return hits


def log_hits(path, offset, needles, limit=64 << 20):
    """How many delivery lines (msgid=...) after offset in Dovecot's log name one of needles:
    a message that a POP3 device deleted since is still found here."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read(limit)
    except (OSError, TypeError):
        return 0
    return sum(1 for line in text.splitlines()
               if b"msgid=<soak-fault-vanish-" in line and any(n.encode() in line for n in needles))


def devices_vanish(ctx, at, secs):
    state = {"stop": threading.Event()}
    mids, counts = [], {}

    def loop(login):
        while True:
            vanish_round(ctx, login, mids, counts)
            if state["stop"].wait(VANISH_EVERY_S):
                return

    def start():
        acc = Accounts(ctx)
        login = f"soak-fault-vanish-{uuid.uuid4().hex[:8]}@example.test"
        counts["mailbox"] = acc.mailbox
        state["since"], state["acc"] = time.time() - 1, acc
        try:
            state["log_at"] = os.path.getsize(ctx.upstream_env.get("DOVECOT_LOG", ""))
        except OSError:
            state["log_at"] = None
        state["block"] = acc.add(login)
        t = threading.Thread(target=loop, args=(login,), daemon=True)
        state["thread"] = t
        t.start()
        ctx.log(f"fault devices-vanish: devices of {login} reset their connections mid-DATA, mid-APPEND "
                f"and mid-FETCH every {VANISH_EVERY_S} s for {secs:.0f} s")

    def stop():
        if state.get("stopped") or "since" not in state:
            return
        state["stopped"] = True
        state["stop"].set()
        if "thread" in state:
            state.pop("thread").join(60)
        if "block" in state:
            state["acc"].remove(state.pop("block"))
        done = {k: v for k, v in counts.items() if k not in ("mailbox", "failed")}
        for err in counts.get("failed", [])[:5]:
            f.notes.append("could not cut: " + err)
        f.notes.append("cut: " + ", ".join(f"{k} {v}" for k, v in sorted(done.items())))
        time.sleep(2)  # let a wrongly finished delivery land
        hits = maildir_hits(ctx.upstream_env["OXB_UPSTREAM_DIR"], mids, state["since"])
        logged = log_hits(ctx.upstream_env.get("DOVECOT_LOG"), state["log_at"], mids)
        f.notes.append(f"cut messages found in the upstream's Maildirs: {hits}, delivered by Dovecot's "
                       f"log: {logged} (must be 0)")
        if hits or logged:
            f.error = f"{max(hits, logged)} message(s) cut mid-way reached a mailbox"
        ctx.log("fault devices-vanish: " + "; ".join(f.notes[-2:]))
    f = Fault(at, "devices-vanish", start, stop, secs)
    return f


# (kind, maker, nominal seconds) in the order of a 60-minute run. The SIGKILL comes first, so that
# one oxbridge process lives through the rest of the run (its memory and descriptors over time).
FULL = [
    ("oxbridge-sigkill", oxbridge_sigkill, 10),
    ("devices-vanish", devices_vanish, 60),
    ("postfix-down", postfix_down, 90),
    ("reload-accounts", reload_accounts, 120),
    ("token-endpoint", None, 120),
    ("dovecot-restart", dovecot_restart, 15),
    ("spool-disk-full", spool_disk_full, 90),
    ("redis-restart", redis_restart, 5),
    ("postfix-down", postfix_down, 120),
    ("reload-accounts", reload_accounts, 60),
    ("devices-vanish", devices_vanish, 60),
]
PRIORITY = [2, 0, 3, 1, 4, 5, 6, 7, 8, 9, 10]  # which of FULL a shorter run keeps first
QUICK = [("oxbridge-sigkill", oxbridge_sigkill, 5), ("reload-accounts", reload_accounts, 20),
         ("postfix-down", postfix_down, 20)]


def make(ctx, kind, at, secs):
    if kind == "token-endpoint":
        return token_endpoint(ctx, at, secs / 2, secs / 2)
    return {k: m for k, m, _ in FULL}[kind](ctx, at, secs)


def schedule(ctx, minutes):
    """The faults of a run of `minutes`, spread between its first 10% and its last 15%."""
    total = float(minutes) * 60
    quick = bool(getattr(ctx, "quick", False)) or minutes <= 5
    first, last = max(15.0, 0.10 * total), 0.85 * total
    n = len(QUICK) if quick else max(3, min(len(FULL), int((last - first) // 150)))
    plan = QUICK if quick else [FULL[i] for i in sorted(PRIORITY[:n])]
    gap = (last - first) / n
    out = []
    for i, (kind, _, secs) in enumerate(plan):
        secs = min(secs, max(5.0, gap - (10 if quick else 30)))
        f = make(ctx, kind, first + i * gap, secs)
        f.log = ctx.log
        out.append(f)
    ctx.log("faults: " + ", ".join(f"{f.name} at {f.at_s:.0f}s for {f.duration_s:.0f}s" for f in out))
    return out


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] != ["--selftest"]:
        sys.exit("usage: python3 bench/soak_faults.py --selftest [--oxbridge-bin PATH]")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import soak_faults_selftest
    sys.exit(soak_faults_selftest.main())
