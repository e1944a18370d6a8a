"""The swap workload's busy-mailbox phase: IMAP session moves while other
sessions change the mailbox.

After the quiet phase (IDLE and NOOP devices), a fresh oxbridge on the same
ports, with the same short tokens and the same Exchange-like front of the
test upstream, relays K busy devices, each a process of its own
(`bench.py busy-client`), on one folder of one mailbox. Each device keeps
its session for the whole phase and sends, at random, APPEND, STORE of
flags, STORE of \\Deleted followed by EXPUNGE, FETCH, SEARCH, NOOP and short
IDLEs, in sequence-number and UID forms, timing every command's round trip.
A `NO` (a message another device has just expunged) is counted, not fatal;
a `* BYE` is counted and the device logs in again and goes on. With
emailproxy, K more devices do the same through it on a folder of their own
(emailproxy cannot move a session: the front ends each at token expiry).

oxbridge's log gives the moves (`held_ms`) and the refusals (`reason`);
its /metrics the counters of moves, refusals, deferrals and
reconciliations. A fresh oxbridge means a cold token cache, so the first
moves come about 3/4 of a token lifetime after the devices log in, and the
commands before them are the baseline.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

# Commands and their weights in the random mix (the delete is STORE \Deleted + EXPUNGE).
MIX = [("append", 3), ("flags", 3), ("delete", 2), ("fetch", 3), ("search", 1.5), ("noop", 1.5), ("idle", 1)]
# Kinds of timed command; LOGIN and SELECT are timed but left out of the overall percentiles.
KINDS = ["APPEND", "STORE", "STORE-DEL", "EXPUNGE", "FETCH", "SEARCH", "NOOP", "IDLE", "DONE", "LOGIN", "SELECT"]
MIX_KINDS = [k for k in KINDS if k not in ("LOGIN", "SELECT")]
FEW, MANY = 20, 150  # the mailbox size the devices steer towards
SEED_MESSAGES = 40
LIMIT_S = 30  # any one reply
# the /metrics series the row shows (some only exist in newer builds)
METRICS = ("oxbridge_imap_swaps_total", "oxbridge_imap_swap_refusals_total", "oxbridge_imap_swap_deferrals_total",
           "oxbridge_imap_reconciliations_total", "oxbridge_imap_reconciled_total",
           "oxbridge_imap_swap_duration_seconds_sum", "oxbridge_imap_swap_duration_seconds_count")

LITERAL_RE = re.compile(rb"\{(\d+)\}$")
EXISTS_RE = re.compile(rb"\* (\d+) EXISTS")
EXPUNGE_RE = re.compile(rb"\* (\d+) EXPUNGE")
UID_RE = re.compile(rb"\bUID (\d+)")
APPENDUID_RE = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


class Bye(Exception):
    """The server's `* BYE`: the session is over."""


def message(user, k, rnd):
    body = "".join(rnd.choice("abcdefghij klmnop\r\n") for _ in range(rnd.randint(100, 1500)))
    return (f"From: bench@example.test\r\nTo: {user}\r\nSubject: busy bench {k}\r\n"
            f"Message-ID: <busy-{k}-{time.time():.6f}-{rnd.random():.9f}@bench.invalid>\r\n\r\n"
            f"{body}\r\n").encode()


class Device:
    """One busy device's session and what it knows of the folder: the
    number of messages (from EXISTS and EXPUNGE) and some UIDs."""

    def __init__(self, imap, a, rnd, out):
        self.Imap, self.a, self.rnd, self.out = imap, a, rnd, out
        self.c = None
        self.exists = 0
        self.uids = []
        self.k = 0

    def reply_line(self):
        """One response line, literals included (their bytes replaced by their size)."""
        c = self.c
        ln = c.line()
        while True:
            m = LITERAL_RE.search(ln)
            if not m:
                return ln
            n = int(m.group(1))
            while len(c.buf) < n:
                d = c.sock.recv(65536)
                if not d:
                    raise ConnectionError("connection closed by the server")
                c.buf += d
            del c.buf[:n]
            ln = ln[:m.start()] + b"<%d bytes>" % n + c.line()

    def untagged(self, ln):
        if ln.startswith(b"* BYE"):
            raise Bye(ln.decode(errors="replace"))
        m = EXPUNGE_RE.match(ln)
        if m:
            self.exists = max(0, self.exists - 1)
            return
        m = EXISTS_RE.match(ln)
        if m:
            self.exists = int(m.group(1))
            return
        if ln.startswith(b"* SEARCH"):
            return
        m = UID_RE.search(ln)
        if m and ln.startswith(b"* ") and b" FETCH " in ln:
            self.know(int(m.group(1)))

    def know(self, uid):
        self.uids.append(uid)
        if len(self.uids) > 400:
            del self.uids[:100]

    def run(self, kind, text, literal=None):
        """Send one command, read to its tagged reply; record [start, kind, ms, status, local port]."""
        c = self.c
        tag = c.tag()
        t0 = time.time()
        self.out["in_flight"] = kind
        if literal is None:
            c.send(f"{tag} {text}\r\n".encode())
        else:  # LITERAL+
            c.send(f"{tag} {text} {{{len(literal)}+}}\r\n".encode() + literal + b"\r\n")
        got = []
        while True:
            ln = self.reply_line()
            if ln.startswith(tag.encode() + b" "):
                break
            self.untagged(ln)
            got.append(ln)
        status = (ln.split(b" ", 2) + [b""])[1].decode(errors="replace")
        self.out["cmds"].append([round(t0, 6), kind, round((time.time() - t0) * 1000, 3), status, c.local_port])
        if status == "BAD":
            self.out["bad"].append(f"{text[:60]} -> {ln.decode(errors='replace')[:120]}")
        return status, ln, got

    def seq(self):
        return self.rnd.randint(1, self.exists)

    def uid(self):
        return self.rnd.choice(self.uids)

    def target(self):
        """A message to act on, in sequence-number or UID form: (prefix, set)."""
        if self.uids and self.rnd.random() < 0.5:
            return "UID ", str(self.uid())
        return "", str(self.seq())

    def login(self):
        a = self.a
        self.c = self.Imap(a.port, timeout=LIMIT_S)
        self.out["ports"].append(self.c.local_port)
        st, ln, _ = self.run("LOGIN", f'LOGIN "{a.user}" "{a.password}"')
        if st != "OK":
            raise ConnectionError(f"LOGIN: {ln.decode(errors='replace')}")
        self.exists, self.uids = 0, []
        st, ln, _ = self.run("SELECT", f"SELECT {a.folder}")
        if st != "OK":
            raise ConnectionError(f"SELECT: {ln.decode(errors='replace')}")

    def step(self):
        rnd, a = self.rnd, self.a
        w = dict(MIX)
        if self.exists < FEW:
            w["append"] *= 3
        if self.exists > MANY:
            w["delete"] *= 3
        op = rnd.choices(list(w), list(w.values()))[0]
        if op in ("flags", "delete", "fetch") and self.exists == 0:
            op = "append"
        if op == "append":
            self.k += 1
            flags = rnd.choice(["", "(\\Seen) ", "(\\Flagged) "])
            st, ln, _ = self.run("APPEND", f"APPEND {a.folder} {flags}".rstrip(),
                                 message(a.user, f"{a.name}-{self.k}", rnd))
            m = APPENDUID_RE.search(ln)
            if m:
                self.know(int(m.group(1)))
        elif op == "flags":
            pre, s = self.target()
            change = rnd.choice(["+FLAGS (\\Seen)", "-FLAGS (\\Seen)", "+FLAGS (\\Flagged)", "-FLAGS (\\Flagged)"])
            self.run("STORE", f"{pre}STORE {s} {change}")
        elif op == "delete":
            pre, s = self.target()
            self.run("STORE-DEL", f"{pre}STORE {s} +FLAGS.SILENT (\\Deleted)")
            self.run("EXPUNGE", "EXPUNGE")
        elif op == "fetch":
            x = rnd.random()
            if x < 0.4:
                self.run("FETCH", f"FETCH {self.seq()} (UID FLAGS RFC822.SIZE)")
            elif x < 0.7:
                lo = self.seq()
                self.run("FETCH", f"FETCH {lo}:{min(self.exists, lo + rnd.randint(0, 20))} (UID FLAGS)")
            else:
                pre, s = self.target()
                self.run("FETCH", f"{pre}FETCH {s} (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)])")
        elif op == "search":
            x = rnd.random()
            if x < 0.5:
                st, _, got = self.run("SEARCH", "UID SEARCH ALL")
                found = [int(u) for ln in got if ln.startswith(b"* SEARCH") for u in ln.split()[2:] if u.isdigit()]
                if st == "OK":
                    self.uids = found[-400:]
            else:
                self.run("SEARCH", rnd.choice(["SEARCH UNSEEN", "UID SEARCH FLAGGED", "SEARCH SUBJECT busy"]))
        elif op == "noop":
            self.run("NOOP", "NOOP")
        else:
            self.idle(rnd.uniform(0.2, a.idle_max_ms / 1000))

    def idle(self, secs):
        c = self.c
        tag = c.tag()
        t0 = time.time()
        self.out["in_flight"] = "IDLE"
        c.send(f"{tag} IDLE\r\n".encode())
        while True:
            ln = self.reply_line()
            if ln.startswith(b"+"):
                break
            if ln.startswith(tag.encode() + b" "):  # refused
                self.out["cmds"].append([round(t0, 6), "IDLE", round((time.time() - t0) * 1000, 3),
                                         (ln.split(b" ", 2) + [b""])[1].decode(errors="replace"), c.local_port])
                return
            self.untagged(ln)
        self.out["cmds"].append([round(t0, 6), "IDLE", round((time.time() - t0) * 1000, 3), "+", c.local_port])
        until = min(time.time() + secs, self.a.end_at)
        while True:
            left = until - time.time()
            if left <= 0:
                break
            c.sock.settimeout(left)
            try:
                ln = self.reply_line()
            except TimeoutError:
                break
            finally:
                c.sock.settimeout(LIMIT_S)
            self.untagged(ln)
        t1 = time.time()
        self.out["in_flight"] = "DONE"
        c.send(b"DONE\r\n")
        while True:
            ln = self.reply_line()
            if ln.startswith(tag.encode() + b" "):
                break
            self.untagged(ln)
        self.out["cmds"].append([round(t1, 6), "DONE", round((time.time() - t1) * 1000, 3),
                                 (ln.split(b" ", 2) + [b""])[1].decode(errors="replace"), c.local_port])


def client(argv, imap, sleep_until):
    """One busy device, in a process of its own; prints one JSON object."""
    ap = argparse.ArgumentParser(prog="bench.py busy-client")
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--start-at", type=float, default=0)
    ap.add_argument("--end-at", type=float, required=True)
    ap.add_argument("--gap-ms", type=float, default=50, help="mean pause between commands (uniform 0..2x)")
    ap.add_argument("--idle-max-ms", type=float, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rnd = random.Random(a.seed)
    out = {"name": a.name, "cmds": [], "byes": [], "drops": [], "bad": [], "ports": [], "in_flight": None}
    d = Device(imap, a, rnd, out)
    sleep_until(a.start_at)
    while time.time() < a.end_at:
        try:
            if d.c is None:
                d.login()
            while time.time() < a.end_at:
                d.step()
                time.sleep(rnd.uniform(0, 2 * a.gap_ms / 1000))
            d.c.close()
            d.c = None
        except Bye as e:
            out["byes"].append([round(time.time(), 6), out["in_flight"], str(e)[:160]])
            d.c = None
        except (OSError, ConnectionError, RuntimeError) as e:
            out["drops"].append([round(time.time(), 6), out["in_flight"], f"{type(e).__name__}: {e}"[:200]])
            d.c = None
            time.sleep(0.5)
    out.pop("in_flight")
    print(json.dumps(out))


def seed(imap, port, ca, user, token, folders, n):
    """CREATE the folders (NO if there already) and fill each with n messages."""
    c = imap(port, ca)
    c.login(user, token=token)
    rnd = random.Random(1)
    for folder in folders:
        c.command(f"CREATE {folder}")
        for k in range(n):
            c.ok(f"APPEND {folder}", message(user, f"seed-{k}", rnd))
    c.close()


def parse_metrics(lines):
    """Prometheus text lines to {name: {labels: value}}."""
    m = {}
    for ln in lines:
        if ln.startswith("#") or " " not in ln:
            continue
        key, val = ln.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        try:
            m.setdefault(name, {})[labels.rstrip("}")] = float(val)
        except ValueError:
            pass
    return m


def phase(args, out, procs, N, real, ca, real_token, ports, password, start_oxbridge, start_emailproxy, tools):
    """Run the busy phase; its results (report key swap.busy)."""
    imap, sleep_until, oxbridge_swaps, metric_lines, parse_log_time, log = tools
    k, secs, user = N["busy_devices"], N["busy_secs"], N["busy_user"]
    folders = {"oxbridge": "bench-busy", "emailproxy": "bench-busy-ep"}
    paths = {"oxbridge": ports["oxbridge"]}
    start_oxbridge()
    if args.emailproxy:
        start_emailproxy()
        paths["emailproxy"] = ports["emailproxy"]
    seed(imap, real["imap"], ca, user, open(real_token).read().strip(), [folders[p] for p in paths], SEED_MESSAGES)
    t0 = time.time() + 1.0
    end = t0 + secs
    me = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "busy-client"]
    log(f"swap, busy mailbox: {secs} s; {k} devices on one folder through "
        f"{' and '.join(f'{p} (:{port})' for p, port in paths.items())}, a command every ~{N['busy_gap_ms']} ms each")
    running = {}
    for path, port in paths.items():
        for i in range(k):
            name = f"{path}-{i + 1}"
            argv = ["--name", name, "--port", port, "--user", user, "--password", password,
                    "--folder", folders[path], "--start-at", f"{t0 + 0.1 * i:.3f}", "--end-at", f"{end:.3f}",
                    "--gap-ms", N["busy_gap_ms"], "--idle-max-ms", N["busy_idle_max_ms"], "--seed", 1000 + i]
            running[name] = subprocess.Popen(me + [str(x) for x in argv], stdout=subprocess.PIPE,
                                             stderr=open(os.path.join(out, f"swap-busy-{name}.log"), "ab"))
    got = {}
    for name, p in running.items():
        try:
            o, _ = p.communicate(timeout=secs + 90)
            got[name] = json.loads(o.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            p.kill()
            got[name] = {"name": name, "error": f"no result: {e}", "cmds": [], "byes": [], "drops": [], "bad": []}
    metrics = metric_lines(f"http://127.0.0.1:{ports['admin']}/metrics", METRICS)
    procs.stop("oxbridge-swapbusy")
    procs.stop("emailproxy-swapbusy")
    swaps, refusals = oxbridge_swaps(os.path.join(out, "oxbridge-swapbusy.log"))
    for r in refusals:
        r["at_s"] = parse_log_time(r.get("at") or "")
    res = {"secs": secs, "devices": k, "gap_ms": N["busy_gap_ms"], "idle_max_ms": N["busy_idle_max_ms"],
           "seed_messages": SEED_MESSAGES, "user": user, "folders": folders, "start": t0, "end": end, "paths": {}}
    for path in paths:
        res["paths"][path] = {"devices": [got[n] for n in running if n.startswith(path + "-")]}
    ox = res["paths"]["oxbridge"]
    ox.update({"swaps": swaps, "refusals": refusals, "metrics": metrics})
    return res


def pct(xs, p):
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))]


def metric_sum(m, name, label=None):
    """Sum of a counter's series, or {label value: sum} by one label; 0 when absent."""
    series = m.get(name, {})
    if label is None:
        return int(sum(series.values()))
    out = {}
    for labels, v in series.items():
        lm = re.search(label + r'="([^"]*)"', labels)
        key = lm.group(1) if lm else "?"
        out[key] = out.get(key, 0) + int(v)
    return out


def summary(path, x, oxbridge):
    """One row of the busy table, from one path's raw results."""
    devs = x["devices"]
    cmds = [c for d in devs for c in d.get("cmds", [])]
    byes = [b for d in devs for b in d.get("byes", [])]
    drops = [b for d in devs for b in d.get("drops", [])]
    bad = [b for d in devs for b in d.get("bad", [])]
    s = {"path": path, "devices": len(devs), "commands": len(cmds), "byes": len(byes), "drops": len(drops),
         "bad": len(bad), "bad_samples": bad[:3], "no": sum(1 for c in cmds if c[3] == "NO"),
         "errors": [d["error"] for d in devs if d.get("error")], "drop_samples": [b[2] for b in drops[:3]]}
    bye_lines = {}
    for b in byes:
        bye_lines[b[2]] = bye_lines.get(b[2], 0) + 1
    s["bye_lines"] = bye_lines
    s["bye_in"] = {}
    for b in byes:
        s["bye_in"][b[1] or "-"] = s["bye_in"].get(b[1] or "-", 0) + 1
    holds = []
    if oxbridge:
        sw = [w for w in x.get("swaps", []) if w.get("end")]
        held = [w["held_ms"] for w in sw if w.get("held_ms") is not None]
        m = parse_metrics(x.get("metrics") or [])
        s.update({
            "moves_log": len(sw), "refusals_log": len(x.get("refusals", [])),
            "moves": metric_sum(m, "oxbridge_imap_swaps_total"),
            "refusals": metric_sum(m, "oxbridge_imap_swap_refusals_total"),
            "refusal_reasons": metric_sum(m, "oxbridge_imap_swap_refusals_total", "reason"),
            "deferrals": metric_sum(m, "oxbridge_imap_swap_deferrals_total"),
            "deferral_reasons": metric_sum(m, "oxbridge_imap_swap_deferrals_total", "reason"),
            "reconciliations": metric_sum(m, "oxbridge_imap_reconciliations_total"),
            "reconciled": {k: metric_sum(m, "oxbridge_imap_reconciled_total", "kind").get(k, 0)
                           for k in ("expunge", "arrival", "flags")},
            "metrics_present": sorted(n for n in METRICS if n in m),
            "held_p50_ms": pct(held, 50), "held_max_ms": max(held) if held else None,
        })
        if not m:  # /metrics unreachable: the log's counts
            s["moves"], s["refusals"] = s["moves_log"], s["refusals_log"]
        tried = s["moves"] + s["refusals"]
        s["moved_share"] = s["moves"] / tried if tried else None
        events = [w["end"] - (w.get("held_ms") or 0) / 1000 for w in sw]
        events += [r["at_s"] for r in x.get("refusals", []) if r.get("at_s")]
        first = min(events) if events else None
        # the hold: from the pause (held_ms before the log line; whole ms, so up to 1 ms more) to the log line
        holds = [(w["end"] - ((w.get("held_ms") or 0) + 1) / 1000, w["end"], w.get("port")) for w in sw]
    else:  # no moves: the front's BYE at the first token expiry splits the run
        first = min((b[0] for b in byes), default=None)
    s["first_event"] = first
    mix = [c for c in cmds if c[1] in MIX_KINDS]
    before = [c[2] for c in mix if first is None or c[0] < first]
    after = [c[2] for c in mix if first is not None and c[0] >= first]
    s.update({"before_n": len(before), "before_p50_ms": pct(before, 50), "before_p99_ms": pct(before, 99),
              "after_n": len(after), "after_p50_ms": pct(after, 50), "after_p99_ms": pct(after, 99),
              "after_max_ms": max(after) if after else None})
    # the moving session's own commands in flight during its hold
    in_hold = [c[2] for c in cmds if any(c[0] <= b and c[0] + c[2] / 1000 >= a and c[4:5] == [port]
                                         for a, b, port in holds)]
    s["in_hold_n"], s["in_hold_max_ms"] = len(in_hold), max(in_hold) if in_hold else None
    per = {}
    for kind in KINDS:
        ks = [c for c in cmds if c[1] == kind]
        if not ks:
            continue
        b = [c[2] for c in ks if first is None or c[0] < first]
        a = [c[2] for c in ks if first is not None and c[0] >= first]
        per[kind] = {"n": len(ks), "no": sum(1 for c in ks if c[3] == "NO"), "bad": sum(1 for c in ks if c[3] == "BAD"),
                     "before_p50_ms": pct(b, 50), "before_p99_ms": pct(b, 99),
                     "after_p50_ms": pct(a, 50), "after_p99_ms": pct(a, 99), "after_max_ms": max(a) if a else None}
    s["per_kind"] = per
    return s
