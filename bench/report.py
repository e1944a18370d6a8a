#!/usr/bin/env python3
"""Render bench results (results.json) as the benchmark's table, with each
target of the performance goals judged MET / NOT MET from the measured numbers.

    python3 bench/report.py OUT/results.json
"""
import json
import statistics
import sys

PROTOS = [("imap", "IMAP"), ("pop3", "POP3"), ("smtp", "SMTP")]
BULK_NAMES = {"imap": "IMAP FETCH", "pop3": "POP3 RETR", "smtp": "SMTP DATA"}
PATHS = ["direct", "oxbridge", "emailproxy"]


def pct(xs, p):
    """Nearest-rank percentile (p in 0..100) of a list; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def f(x, nd=1, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float) and (x != x):
        return "-"
    return f"{x:.{nd}f}{unit}"


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{nd}f}x"


def table(headers, rows, align=None):
    cols = len(headers)
    w = [max(len(str(r[i])) for r in [headers] + rows) for i in range(cols)]
    align = align or ["<"] + [">"] * (cols - 1)
    line = lambda r: "  ".join(f"{str(r[i]):{align[i]}{w[i]}}" for i in range(cols)).rstrip()
    out = [line(headers), line(["-" * x for x in w])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def add(a, b):
    return None if a is None or b is None else a + b


def login_stats(x):
    """Pool the rounds of one path and protocol: latencies pooled; logins/s
    is the median of the rounds' rates (each round: ok logins / its wall time)."""
    runs = [r for r in x.get("runs", [x]) if "failed" not in r]
    sl, cl, rates, samples = [], [], [], []
    seq_err = conc_err = total = tokens = 0
    cpu, n_conc = 0.0, 0
    for r in runs:
        seq, conc = r.get("seq", {}), r.get("conc", {})
        sl += seq.get("lat_ms", [])
        cl += conc.get("lat_ms", [])
        seq_err += seq.get("errors", 0)
        conc_err += conc.get("errors", 0)
        total += conc.get("total", 0)
        tokens += r.get("token_requests") or 0
        if conc.get("wall_s"):
            rates.append(len(conc.get("lat_ms", [])) / conc["wall_s"])
        cpu = add(cpu, conc.get("proxy_cpu_s"))
        n_conc += conc.get("total", 0)
        samples += (seq.get("error_samples") or []) + (conc.get("error_samples") or [])
    failed = len(x.get("runs", [x])) - len(runs)
    return {
        "p50": pct(sl, 50), "p99": pct(sl, 99), "seq_err": seq_err + failed, "n_seq": len(sl) + seq_err,
        "cp50": pct(cl, 50), "cp99": pct(cl, 99), "rate": statistics.median(rates) if rates else None,
        "rate_min": min(rates) if rates else None, "rate_max": max(rates) if rates else None,
        "conc_err": conc_err + failed, "ok": len(cl), "total": total, "tokens": tokens, "rounds": len(runs),
        "cpu_ms": cpu * 1000 / n_conc if cpu is not None and n_conc else None,
        "samples": sorted(set(samples)),
    }


def merge_bulk(x):
    runs = [r for r in x.get("runs", [x])] if x else []
    if not runs or any("failed" in r for r in runs):
        return None
    m = {"mbps": [], "secs": [], "bytes_total": 0, "cpu_s": 0.0, "sched_s": 0.0, "driver_cpu_s": 0.0,
         "bytes_each": runs[0]["bytes_each"]}
    for r in runs:
        m["mbps"] += r["mbps"]
        m["secs"] += r["secs"]
        m["bytes_total"] += r["bytes_total"]
        m["cpu_s"] = add(m["cpu_s"], r.get("cpu_s"))
        m["sched_s"] = add(m["sched_s"], r.get("sched_s"))
        m["driver_cpu_s"] = add(m["driver_cpu_s"], r.get("driver_cpu_s"))
    return m


def bulk_stats(x):
    r = merge_bulk(x)
    if not r:
        return None
    m = r.get("mbps") or []
    gb = r.get("bytes_total", 0) / 1e9
    cpu = r.get("cpu_s")
    sched = r.get("sched_s")
    return {
        "med": statistics.median(m) if m else None, "min": min(m) if m else None, "max": max(m) if m else None,
        "n": len(m), "size": r.get("bytes_each"), "gb": gb,
        "cpu_gb": cpu / gb if cpu is not None and gb else None,
        "sched_gb": sched / gb if sched is not None and gb else None,
        "client_gb": r["driver_cpu_s"] / gb if r.get("driver_cpu_s") is not None and gb else None,
    }


def verdict(ok):
    return "MET" if ok else "NOT MET"


def busy_section(B, ttl):
    """The swap workload's busy-mailbox row (see README.md)."""
    import busy

    if B.get("failed"):
        return ["", f"  BUSY MAILBOX: failed: {B['failed']}"]
    out = ["", f"  BUSY MAILBOX: {B['devices']} devices per path on one folder of {B['user']} for {B['secs']} s "
                f"({ttl}-s tokens; a fresh oxbridge, so a cold token cache), each keeping its session and sending "
                f"a command every ~{B['gap_ms']} ms at random: APPEND, STORE flags, STORE \\Deleted + EXPUNGE, "
                f"FETCH, SEARCH, NOOP, IDLE of 0.2-{B['idle_max_ms'] / 1000:g} s; sequence-number and UID forms; "
                f"{B['seed_messages']} messages at the start; a device that gets * BYE logs in again"]
    rows, sums = [], {}
    for path in PATHS:
        x = B["paths"].get(path)
        if not x:
            continue
        ox = path == "oxbridge"
        s = sums[path] = busy.summary(path, x, ox)
        na = lambda v: v if ox else "n/a"
        rows.append([path, na(s.get("moves")), na(s.get("refusals")),
                     na(f(100 * s["moved_share"], 0, "%") if ox and s["moved_share"] is not None else "-"),
                     na(f(s.get("held_p50_ms"), 0)), na(f(s.get("held_max_ms"), 0)), s["byes"], s["drops"],
                     s["commands"], s["no"], s["bad"], f(s["before_p50_ms"], 2), f(s["before_p99_ms"], 1),
                     f(s["after_p50_ms"], 2), f(s["after_p99_ms"], 1), f(s["after_max_ms"], 0),
                     na(f(s["in_hold_max_ms"], 1))])
    out.append(table(["path", "moves", "refused", "moved", "held p50 ms", "max", "BYEs", "drops", "commands", "NO",
                      "BAD", "before p50 ms", "p99", "after p50 ms", "p99", "max", "max in hold ms"], rows))
    s = sums.get("oxbridge")
    if s:
        rr = "; ".join(f"{k} {v}" for k, v in sorted(s["refusal_reasons"].items())) or "none"
        dr = "; ".join(f"{k} {v}" for k, v in sorted(s["deferral_reasons"].items()))
        rc = s["reconciled"]
        missing = [n for n in busy.METRICS if n not in s["metrics_present"] and "duration" not in n]
        out.append(f"  oxbridge /metrics: moves {s['moves']}, refusals by reason: {rr}; deferrals {s['deferrals']}"
                   + (f" ({dr})" if dr else "") + f"; reconciliations {s['reconciliations']} (replayed: expunge "
                   f"{rc['expunge']}, arrival {rc['arrival']}, flags {rc['flags']})"
                   + (f"; not in this build's /metrics (shown as 0): {', '.join(missing)}" if missing else ""))
        out.append(f"  oxbridge log: {s['moves_log']} moves, {s['refusals_log']} refusals; moved = moves / (moves + "
                   f"refusals); held: the log's held_ms per move (whole ms); max in hold: the moving session's "
                   f"commands in flight during its hold ({s['in_hold_n']})")
    for path, p in sums.items():
        if p["byes"]:
            out.append(f"  {path}: BYEs " + "; ".join(f"{n} x {line}" for line, n in p["bye_lines"].items())
                       + " (during: " + ", ".join(f"{k} {v}" for k, v in sorted(p["bye_in"].items())) + ")")
        for e in p["drop_samples"] + p["errors"]:
            out.append(f"  {path}: dropped: {e}")
        for b in p["bad_samples"]:
            out.append(f"  {path}: BAD: {b}")
    out.append("  before = commands sent before the first move or refusal (emailproxy: before the front's first "
               "BYE), after = from then on; LOGIN and SELECT not counted there; NO = mostly a message another "
               "device had just expunged; BAD = a message number the device believed valid was not (a view that "
               "disagrees with the server's); drops = connections lost without a BYE")
    if s:
        rows = [[k, v["n"], v["no"], v["bad"], f(v["before_p50_ms"], 2), f(v["before_p99_ms"], 1),
                 f(v["after_p50_ms"], 2), f(v["after_p99_ms"], 1), f(v["after_max_ms"], 0)]
                for k, v in s["per_kind"].items()]
        out.append("  oxbridge, per command:")
        out.append(table(["command", "n", "NO", "BAD", "before p50 ms", "p99", "after p50 ms", "p99", "max"], rows))
    return out


def render(res):
    out = []
    m = res.get("machine", {})
    out.append(f"oxbridge benchmark  {res.get('started', '')}  oxbridge {res.get('oxbridge_commit', '?')}"
               + (f" (binary {res['oxbridge_binary']})" if res.get("oxbridge_binary") else ""))
    out.append(f"machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('mem_gib')} GiB, {m.get('kernel')}, "
               f"open-files hard limit {m.get('nofile_hard')}; load average {m.get('loadavg_start', '?')} at the "
               f"start, {m.get('loadavg_end', '?')} at the end")
    out.append("MB = 10^6 bytes; GB = 10^9 bytes. Devices speak plain text to the proxies on loopback; "
               "'direct' is XOAUTH2 over TLS to the server.")
    targets = []

    # ------------------------------------------------------------------ login
    def login_table(L, title, judge):
        p = res["params"]
        out.append("")
        out.append(title)
        out.append(f"  {p['seq']} sequential logins, then batches of {p['total']} at {p['conc']}-way concurrency "
                   f"({p['login_timeout']} s timeout); direct and oxbridge take turns over {p['rounds']} rounds, "
                   f"emailproxy runs once; latency = TCP connect to login OK")
        rows = []
        for proto, name in PROTOS:
            st = {path: login_stats(L[path][proto]) for path in PATHS if path in L and proto in L[path]}
            d = st.get("direct")
            e = st.get("emailproxy")
            for path in PATHS:
                if path not in st:
                    continue
                s = st[path]
                added = (f"{s['p50'] - d['p50']:+.2f}" if d and path != "direct" and s["p50"] is not None
                         and d["p50"] is not None else "-")
                rows.append([
                    name, path, f(s["p50"], 2), f(s["p99"], 2), str(s["seq_err"]), f(s["cp50"], 1), f(s["cp99"], 1),
                    f(s["rate"], 1), f"{f(s['rate_min'], 0)}-{f(s['rate_max'], 0)}", f"{s['ok']}/{s['total']}",
                    str(s["conc_err"]), f(s["cpu_ms"], 2) if path != "direct" else "-", str(s["tokens"]), added,
                    ratio(s["rate"], d["rate"]) if d and path != "direct" else "-",
                    ratio(s["rate"], e["rate"]) if e and path == "oxbridge" else "-",
                ])
            o = st.get("oxbridge")
            if judge and o and d:
                add_ms = o["p50"] - d["p50"] if o["p50"] is not None and d["p50"] is not None else None
                targets.append((f"{name} login: added p50 latency over direct <= 1 ms",
                                add_ms is not None and add_ms <= 1.0 and o["seq_err"] == 0,
                                f"oxbridge {f(o['p50'], 2)} ms - direct {f(d['p50'], 2)} ms = "
                                f"{f(add_ms, 2)} ms; {o['seq_err']} errors"))
                okr = o["rate"] is not None and d["rate"] and o["rate"] >= 0.9 * d["rate"]
                targets.append((f"{name} 50-way logins: zero errors and >= 0.9x direct logins/s",
                                o["conc_err"] == 0 and bool(okr),
                                f"{o['conc_err']} errors; {f(o['rate'], 1)} vs {f(d['rate'], 1)} logins/s = "
                                f"{ratio(o['rate'], d['rate'])}"))
        out.append(table(["proto", "path", "seq p50 ms", "p99", "err", "conc p50 ms", "p99", "logins/s", "min-max",
                          "ok", "err", "CPU ms/login", "tok", "added p50 ms", "rate/direct", "rate/emailproxy"], rows,
                         ["<", "<"] + [">"] * 14))
        for proto, name in PROTOS:
            # a server that sometimes stalls (the test Postfix after STARTTLS, ~40 ms) makes latencies
            # bimodal and the p50 jumpy: say how often, and the p50 of the other logins
            parts = []
            for path in ("direct", "oxbridge"):
                if path in L and proto in L[path]:
                    lat = [v for r in L[path][proto].get("runs", [L[path][proto]])
                           for v in r.get("seq", {}).get("lat_ms", [])]
                    slow = [v for v in lat if v >= 30]
                    if lat and len(slow) >= 0.1 * len(lat):
                        parts.append(f"{path} {len(slow)}/{len(lat)} (p50 of the rest "
                                     f"{f(pct([v for v in lat if v < 30], 50), 2)} ms)")
            if parts:
                out.append(f"  {name} sequential logins slower than 30 ms: " + ", ".join(parts))
        for proto, name in PROTOS:
            for path in PATHS:
                if path in L and proto in L[path]:
                    for smp in login_stats(L[path][proto])["samples"][:2]:
                        out.append(f"  error seen ({name} {path}): {smp}")
        out.append("  CPU ms/login: the proxy process's utime+stime over the concurrent batches, per login attempted;"
                   " tok: token requests the token endpoint saw during the measured logins (after warm-up)")

    L = res.get("login")
    if L:
        login_table(L, "LOGIN, real upstream (Dovecot/Postfix, warm caches)", True)
    FL = res.get("fastlogin")
    if FL:
        login_table(FL, "LOGIN, in-memory upstream (fakeup): what oxbridge itself adds", False)
    PV = res.get("providers")
    if PV:
        import providers

        out += providers.section(PV, targets)

    # ------------------------------------------------------------------ bulk
    def bulk_table(B, title, ceiling):
        rows = []
        for proto, _ in PROTOS:
            st = {path: bulk_stats(B[path].get(proto)) for path in PATHS if path in B}
            d, e = st.get("direct"), st.get("emailproxy")
            for path in PATHS:
                s = st.get(path)
                if path not in st:
                    continue
                if s is None:
                    rows.append([BULK_NAMES[proto], path, "failed"] + ["-"] * (8 if ceiling else 7))
                    continue
                row = [f"{BULK_NAMES[proto]} {s['size'] / 1e6:.1f} MB x{s['n']}", path, f(s["med"], 1),
                       f"{f(s['min'], 0)}-{f(s['max'], 0)}",
                       ratio(s["med"], d["med"]) if d and path != "direct" else "-",
                       ratio(s["med"], e["med"]) if e and path == "oxbridge" else "-",
                       f(s["cpu_gb"], 2) if path != "direct" else "-",
                       ratio(s["cpu_gb"], e["cpu_gb"], 3) if e and path == "oxbridge" and s["cpu_gb"] is not None
                       and e["cpu_gb"] else "-", f(s["client_gb"], 2)]
                if ceiling:
                    row.append(f(1 / s["cpu_gb"], 2) if path != "direct" and s["cpu_gb"] else "-")
                rows.append(row)
        hdr = ["workload", "path", "MB/s median", "min-max", "vs direct", "vs emailproxy", "CPU s/GB",
               "CPU vs emailproxy", "client CPU s/GB"]
        if ceiling:
            hdr.append("GB/s per core")
        out.append("")
        out.append(title)
        out.append(table(hdr, rows, ["<", "<"] + [">"] * (len(hdr) - 2)))
        out.append("  client CPU s/GB: the benchmark client's own CPU per GB; on the direct path it is what a bare "
                   "TLS client spends reading the same stream")

    B = res.get("bulk")
    if B:
        bulk_table(B, "BULK, real upstream (Dovecot/Postfix); CPU = utime+stime of the proxy process "
                      "(/proc/PID/stat) per GB relayed", False)
        for proto, _ in PROTOS:
            o = bulk_stats(B.get("oxbridge", {}).get(proto))
            d = bulk_stats(B.get("direct", {}).get(proto))
            e = bulk_stats(B.get("emailproxy", {}).get(proto))
            if o and d:
                targets.append((f"{BULK_NAMES[proto]}: >= 0.9x direct MB/s",
                                o["med"] >= 0.9 * d["med"],
                                f"{f(o['med'], 1)} vs {f(d['med'], 1)} MB/s = {ratio(o['med'], d['med'])}"))
            if o and e and o["cpu_gb"] is not None and e["cpu_gb"]:
                targets.append((f"{BULK_NAMES[proto]}: CPU s/GB <= 1/10 of emailproxy's",
                                o["cpu_gb"] <= e["cpu_gb"] / 10,
                                f"{f(o['cpu_gb'], 2)} vs {f(e['cpu_gb'], 2)} s/GB = "
                                f"{ratio(o['cpu_gb'], e['cpu_gb'], 3)}"))
    FB = res.get("fastbulk")
    if FB:
        bulk_table(FB, "BULK, in-memory upstream (fakeup): oxbridge's own ceiling; GB/s per core = "
                       "1 / (CPU s/GB)", True)

    # ------------------------------------------------------------------ scale
    S = res.get("scale")
    if S:
        out.append("")
        out.append(f"SCALE: {S.get('sessions')} IMAP sessions logged in and held through oxbridge "
                   f"(in-memory upstream)")
        if S.get("failed"):
            out.append(f"  failed: {S['failed']}")
        else:
            procs = S.get("processes", 1)
            if procs > 1:
                out.append(f"  NOTE: split over {procs} oxbridge processes: this machine's open-files hard limit "
                           f"is {S.get('fd_hard_limit')} and cannot be raised here (no CAP_SYS_RESOURCE); one "
                           f"process needs 2 sockets per session.")
            rows = [[S["established"], S["errors"], f(S["establish_s"], 2), f(S.get("rss_fresh_kib", 0) / 1024, 1),
                     f(S["rss0_kib"] / 1024, 1),
                     f(S["rss1_kib"] / 1024, 1), f(S["rss_per_session_kib"], 1), S["alive_after"],
                     S["fds1"] - S["fds0"]]]
            out.append(table(["established", "errors", "all up in s", "RSS fresh MiB", "RSS warm MiB",
                              "RSS held MiB", "KiB/session", "answered NOOP", "fds added"], rows, [">"] * 9))
            out.append("  KiB/session = (RSS held - RSS warm) / established; warm = after one login per account; "
                       "accounts use grant = password (no Argon2 in this process)")
            for s in S.get("error_samples") or []:
                out.append(f"  error seen: {s}")
            n = S["sessions"]
            targets.append((f"{n} idle IMAP sessions: zero errors, <= 48 KiB RSS each, all up within 20 s"
                            + (f" ({procs} processes)" if procs > 1 else ""),
                            n >= 10000 and S["errors"] == 0 and S["established"] == n
                            and S["dead_after"] == 0 and S["rss_per_session_kib"] <= 48
                            and S["establish_s"] <= 20,
                            f"{S['established']}/{n} up, {S['errors']} errors, {S['dead_after']} lost; "
                            f"{f(S['rss_per_session_kib'], 1)} KiB/session; {f(S['establish_s'], 2)} s"))

    # ------------------------------------------------------------------ argon2
    A = res.get("argon2")
    if A:
        r = A["rss_kib"]
        out.append("")
        out.append(f"MEMORY AFTER PASSWORD CHECKS: RSS of a fresh oxbridge as {A['accounts']} accounts log in for the "
                   f"first time (one Argon2id check each, m = 19 MiB), then {2 * A['accounts']} repeat logins")
        marks = sorted({0, 1, 2, 5, 10, len(r) - 1} & set(range(len(r))))
        out.append(table(["after first logins"] + [str(i) for i in marks] + ["after repeats"],
                         [["RSS MiB"] + [f(r[i] / 1024, 1) for i in marks] + [f(A["rss_after_repeats_kib"] / 1024, 1)]],
                         ["<"] + [">"] * (len(marks) + 1)))
        out.append(f"  repeat logins (verified-password cache, no Argon2): p50 {f(A['repeat_p50_ms'], 2)} ms")

    # ------------------------------------------------------------------ tokens
    T = res.get("tokens")
    if T:
        out.append("")
        out.append(f"TOKEN ENDPOINT LOAD: {T['logins']} IMAP logins through oxbridge over {T['accounts']} "
                   f"password-grant accounts, cold cache, 50-way")
        out.append(table(["logins ok", "errors", "token requests", "per account", "wall s"],
                         [[T["ok"], T["errors"], T["token_requests"], f(T["token_requests"] / T["accounts"], 2),
                           f(T["wall_s"], 2)]], [">"] * 5))
        for s in T.get("error_samples") or []:
            out.append(f"  error seen: {s}")
        targets.append(("token requests: one per account per token lifetime",
                        T["token_requests"] <= T["accounts"] and T["errors"] == 0,
                        f"{T['token_requests']} requests for {T['accounts']} accounts, {T['ok']} logins ok"))
        if L and "oxbridge" in L:
            warm = sum(login_stats(L["oxbridge"][p])["tokens"] for p, _ in PROTOS if p in L["oxbridge"])
            targets.append(("no token request on a warm cache (all oxbridge login runs)", warm == 0,
                            f"{warm} token requests during the measured oxbridge logins"))


    # ------------------------------------------------------------------ swap
    W = res.get("swap")
    if W:
        out.append("")
        out.append(f"SWAP: IMAP sessions moved to a new upstream login before their token expires "
                   f"({W.get('ttl_s')}-s tokens, {W.get('secs')} s; oxbridge only: direct and emailproxy cannot "
                   f"move a session)")
        if W.get("failed"):
            out.append(f"  failed: {W['failed']}")
        else:
            out.append(f"  IDLE devices on one folder while another session APPENDs a message every {W['append_ms']}"
                       f" ms; delay = the APPEND's tagged OK to the device's * n EXISTS. Upstream: the test "
                       f"upstream's Exchange-like front (Dovecot; {W['appended']} messages through Dovecot's own "
                       f"port), or an in-memory upstream that announces each message at once "
                       f"({W['appended_instant']} messages: also one every {W.get('burst_ms')} ms for "
                       f"{W.get('burst_secs')} s around each expected swap, so that some arrive during the hold)")
            rows = []
            lines = []
            I = dict(W.get("idle", {}))
            entries = [(f"{p}, Dovecot", p, I[p]) for p in PATHS if p in I]
            if W.get("idle_instant"):
                entries.append(("oxbridge, instant upstream", "oxbridge", W["idle_instant"]))
            for label, path, x in entries:
                ox = path == "oxbridge"
                sw = x["swaps"]
                end = x.get("ended")
                if end:
                    fate = f"ended by upstream after {f(end.get('after_s'), 1)} s: {end['line']}"
                elif x.get("done"):
                    fate = f"alive at the end; DONE -> {x['done'].split(' ', 1)[1].split(' (')[0]}"
                else:
                    fate = x.get("error") or "?"
                d = lambda a, b: f(x[a] - x[b], 1) if ox and x.get(a) is not None and x.get(b) is not None else "n/a"
                rows.append([label, len(sw) if ox else "n/a",
                             ", ".join(str(s["held_ms"]) for s in sw) if ox and sw else "n/a",
                             x["messages"], f(x["baseline_p50_ms"], 2), f(x["baseline_p99_ms"], 2),
                             f(x["baseline_max_ms"], 2), f(x["swap_p50_ms"], 2) if ox else "n/a",
                             f(x["swap_max_ms"], 2) if ox else "n/a", d("swap_max_ms", "baseline_p50_ms"),
                             d("swap_max_ms", "baseline_max_ms"), x["no_exists"], fate])
                if ox:
                    for i, s in enumerate(sw, 1):
                        ds = s.get("delays_ms")
                        lines.append(f"  {label}, swap {i}: held {s['held_ms']} ms; {s['messages']} messages in its "
                                     f"window, max {f(s['max_ms'], 2)} ms"
                                     + (" (" + ", ".join(f(v, 1) for v in ds) + ")" if ds else "")
                                     + f"; {s.get('in_hold', 0)} appended during the hold"
                                     + (f", max {f(s['in_hold_max_ms'], 2)} ms" if s.get("in_hold") else ""))
            out.append(table(["IDLE device", "swaps", "held_ms", "msgs", "base p50 ms", "p99", "max",
                              "swap p50 ms", "max", "swap max - base p50", "- base max", "lost", "session"], rows,
                             ["<"] + [">"] * 11 + ["<"]))
            out += lines
            out.append(f"  held_ms: oxbridge's log, whole ms (mean from its histogram: {f(W.get('held_mean_ms'), 2)} "
                       f"ms Dovecot path incl. the NOOP device, {f(W.get('held_mean_instant_ms'), 2)} ms instant); "
                       f"base = messages appended more than 1 s from any swap of that session; swap = appended from "
                       f"{W['window_before_ms']} ms before a hold to {W['window_after_ms']} ms after it; lost = never "
                       f"announced while the session lasted. Dovecot announces changes to an IDLE session 0.5 s "
                       f"after the first one (NOTIFY_DELAY_MSECS), so its delays spread over 0-500 ms and only "
                       f"'- base max' shows a stall there; the instant upstream shows it against the p50")
            nn = W.get("noop", {}).get("oxbridge")
            if nn:
                gap = W.get("noop_gap_ms") or 0
                out.append("")
                out.append(f"  NOOP device through oxbridge to the front (Dovecot): NOOPs "
                           f"{'back to back' if not gap else f'{gap} ms apart'} for {f(nn.get('secs'), 1)} s, logged "
                           f"in {W.get('noop_delay_s')} s after the IDLE device so that their swaps do not coincide")
                rows = [[nn["n"], f(nn["p50_ms"], 3), f(nn["p99_ms"], 3), f(nn["p999_ms"], 3), f(nn["max_ms"], 2),
                         len(nn["swaps"]), ", ".join(str(s["held_ms"]) for s in nn["swaps"]) or "-",
                         ", ".join(f"{s['overlapping']}" for s in nn["swaps"]) or "-",
                         ", ".join(f(s["max_overlapping_ms"], 2) for s in nn["swaps"]) or "-",
                         nn.get("error") or "none"]]
                out.append(table(["NOOPs", "p50 ms", "p99", "p99.9", "max", "swaps", "held_ms",
                                  "NOOPs in hold", "max RTT in hold ms", "error"], rows, [">"] * 9 + ["<"]))
                out.append("  NOOPs in hold: NOOPs in flight at some moment of a swap's hold (held_ms + 1 ms before "
                           "the log line); direct and emailproxy: n/a (no swap: the front ends their sessions at "
                           "token expiry, as the IDLE table shows)")
            for key, label in (("metrics", "Dovecot path"), ("metrics_instant", "instant path")):
                if W.get(key):
                    out.append(f"  /metrics ({label}): " + "; ".join(m for m in W[key] if not m.startswith("#")
                                                                      and "_bucket" not in m))
            cpu = W.get("oxbridge_cpu_s") or {}
            out.append(f"  the front ended {W.get('front_expired')} session(s) at token expiry during the run; "
                       f"oxbridge refused {len(W.get('refusals') or [])} move(s); oxbridge CPU over the run: "
                       + ", ".join(f"{k} {f(v, 2)} s" for k, v in cpu.items()))
            ox, fx = I.get("oxbridge"), W.get("idle_instant")
            good = lambda x: x and len(x["swaps"]) >= 3 and not x.get("ended") and x.get("swap_max_ms") is not None
            e1 = ox["swap_max_ms"] - ox["baseline_max_ms"] if good(ox) else None
            e2 = fx["swap_max_ms"] - fx["baseline_p50_ms"] if good(fx) else None
            noop_max = max([s["max_overlapping_ms"] or 0 for s in nn["swaps"]] or [0]) if nn else None
            ok = (e1 is not None and e1 < 50 and e2 is not None and e2 < 50 and nn is not None
                  and len(nn["swaps"]) >= 3 and not nn.get("error") and noop_max < 50)
            targets.append(("IMAP session moves: >= 3 swaps per device, none ended, stall < 50 ms", ok,
                            f"IDLE (Dovecot) {len(ox['swaps']) if ox else 0} swaps, swap max - base max "
                            f"{f(e1, 1)} ms; IDLE (instant) {len(fx['swaps']) if fx else 0} swaps, swap max - base "
                            f"p50 {f(e2, 1)} ms; NOOP {len(nn['swaps']) if nn else 0} swaps, max RTT in a hold "
                            f"{f(noop_max, 2)} ms"))
            if W.get("busy"):
                out += busy_section(W["busy"], W.get("ttl_s"))

    # ------------------------------------------------------------------ spool
    S = res.get("spool")
    if S:
        out.append("")
        out.append(f"SMTP STORE AND FORWARD: {S['reps']} messages of {S['size']} bytes in one session, per path "
                   f"and round (real Postfix; messages per second, median of the rounds)")
        rate, deliver = {}, {}
        for path in ("direct", "session", "spool", "emailproxy"):
            runs = [r for r in S["paths"].get(path, []) if not r.get("failed") and r.get("accepted_s")]
            if runs:
                rate[path] = pct([S["reps"] / r["accepted_s"] for r in runs], 50)
                deliver[path] = pct([S["reps"] / r["delivered_s"] for r in runs if r.get("delivered_s")], 50)
        names = {"direct": "direct to Postfix", "session": "oxbridge, live relay",
                 "spool": "oxbridge, spool", "emailproxy": "emailproxy"}
        versus = lambda x, base: f"{x / rate[base]:.2f}x" if rate.get(base) else "-"
        rows = [[names[p], f(r, 1), f(deliver[p], 1), versus(r, "direct"), versus(r, "emailproxy")]
                for p, r in rate.items()]
        out.append(table(["path", "accepted/s", "delivered/s", "vs direct", "vs emailproxy"], rows,
                         ["<", ">", ">", ">", ">"]))
        out.append("  accepted: the device's 250s; delivered (spool): until the worker had sent every message "
                   "upstream (one upstream session, no pacing)")

    # ------------------------------------------------------------------ idlemem
    M = res.get("idlemem")
    if M:
        out.append("")
        out.append(f"IDLE MEMORY: {M.get('sessions')} IMAP sessions logged in, SELECTed and held in IDLE through "
                   f"oxbridge (in-memory IDLE-capable upstream)")
        if M.get("failed"):
            out.append(f"  failed: {M['failed']}")
        else:
            rows = [[M["held"], M["errors"], f(M["establish_s"], 2), f(M["rss_fresh_kib"] / 1024, 1),
                     f(M["rss0_kib"] / 1024, 1), f(M["rss1_kib"] / 1024, 1), f(M["rss_per_session_kib"], 1),
                     M["done_ok"], M["fds_added"]]]
            out.append(table(["in IDLE", "errors", "all up in s", "RSS fresh MiB", "RSS warm MiB", "RSS held MiB",
                              "KiB/session", "DONE answered", "fds added"], rows, [">"] * 9))
            out.append(f"  KiB/session = (RSS held - RSS warm) / sessions in IDLE; warm = after one IDLE session per "
                       f"account; binary {M.get('binary')}")
            for s in M.get("error_samples") or []:
                out.append(f"  error seen: {s}")
    # ------------------------------------------------------------------ devtls
    D = res.get("devtls")
    if D:
        import devtls

        hs, bulk = devtls.summary(D)
        out.append("")
        out.append(f"DEVICE TLS: implicit-TLS IMAP listeners of one oxbridge (RSA 2048 certificate), rustls "
                   f"(default) and OpenSSL (tls_min_version = \"1.0\"); Python ssl devices")
        out.append(f"  handshakes: {D['workers']} client processes connect, shake hands, read the greeting and "
                   f"drop the connection (no login), {D['secs']} s per case and round, {D['rounds']} round(s), "
                   f"the cases taking turns")
        rows = [[name, h["negotiated"] or "-", f(h["rate"], 0), f"{f(h['rate_min'], 0)}-{f(h['rate_max'], 0)}",
                 h["ok"], h["errors"], f(h["cpu_ms"], 3)] for name, h in hs.items()]
        out.append(table(["listener and device", "negotiated", "handshakes/s", "min-max", "ok", "err",
                          "CPU ms/handshake"], rows, ["<", "<", ">", ">", ">", ">", ">"]))
        for name, h in hs.items():
            if h["error_sample"]:
                out.append(f"  error seen ({name}): {h['error_sample']}")
        out.append(f"  bulk: FETCH 1 BODY.PEEK[] of {D['fetch_size']} bytes after LOGIN through one session per "
                   f"case and round")
        rows = [[name, b["negotiated"] or "-", b["n"], f(b["p50"], 0), f"{f(b['min'], 0)}-{f(b['max'], 0)}",
                 f(b["cpu_s_gb"], 2)] for name, b in bulk.items()]
        out.append(table(["listener and device", "negotiated", "n", "MB/s p50", "min-max", "CPU s/GB"], rows,
                         ["<", "<", ">", ">", ">", ">"]))
        for name, b in bulk.items():
            if b["failed"]:
                out.append(f"  failed ({name}): {b['failed']}")
        out.append("  CPU: oxbridge's utime+stime over the case's turns, per handshake or per GB moved; "
                   "the Python clients share the machine's cores")

    out.append("")
    out.append("TARGETS (performance goals)")
    for name, ok, detail in targets:
        out.append(f"  [{verdict(ok):7}] {name}: {detail}")
    met = sum(1 for _, ok, _ in targets if ok)
    out.append(f"  {met} of {len(targets)} met")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))), end="")
