"""The soak's accounts (what was acknowledged, delivered, lost; errors by
kind; the slopes; the verdict), its table and its SVG plot. Pure functions
over what soak.py measured, except for reading the spool's queue."""
import html
import os
import re

# counters kept in results.json as they are at the end
COUNTERS = ["oxbridge_sessions_total", "oxbridge_logins_total", "oxbridge_auth_failures_total",
            "oxbridge_refusals_total", "oxbridge_imap_swaps_total", "oxbridge_imap_swap_refusals_total",
            "oxbridge_imap_swap_deferrals_total", "oxbridge_upstream_expiries_total", "oxbridge_spool_accepted_total",
            "oxbridge_spool_deliveries_total", "oxbridge_spool_retries_total", "oxbridge_spool_possible_duplicates_total",
            "oxbridge_spool_dead_letters_total", "oxbridge_spool_bounces_total", "oxbridge_graph_requests_total",
            "oxbridge_throttled_logins_total", "oxbridge_token_requests_total", "oxbridge_mailbox_full_total",
            "oxbridge_config_reloads_total"]

# Descriptors "kept growing": the least-squares slope after warm-up is above
# FD_SLOPE_MAX per minute (30 an hour) AND the count rose by at least
# FD_RISE_MIN from the first sample after warm-up to the last one under load
# (so that a few sessions open at one sample of a short run are not a trend).
FD_SLOPE_MAX = 0.5
FD_RISE_MIN = 4
WARMUP = 0.10  # the first 10 % of the load is warm-up


def parse_slots(page):
    """(mailbox, protocol, sessions, waiting) rows of the status page's
    "Upstream sessions per mailbox" table; [] when it says none is open."""
    i = page.find('id="mailboxes"')
    if i < 0:
        return None
    part = page[i:]
    j = part.find("<h2", 10)
    part = part[:j] if j > 0 else part
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", part, re.S):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
        if len(cells) == 4:
            m = re.match(r"(\d+)\s*/\s*(\d+)", cells[2])
            rows.append((html.unescape(cells[0]), cells[1], int(m.group(1)) if m else -1,
                         int(cells[3]) if cells[3].isdigit() else -1))
    return rows


def slope_per_min(points):
    """Least-squares slope of (t seconds, y) in y per minute; None under 3 points."""
    pts = [(t, y) for t, y in points if y is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    my = sum(y for _, y in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in pts) / den * 60


def spool_msgids(spool):
    """Message-IDs of the messages still in oxbridge's spool queue."""
    out = set()
    q = os.path.join(spool, "queue")
    for d in os.listdir(q) if os.path.isdir(q) else []:
        try:
            with open(os.path.join(q, d, "message"), "rb") as f:
                head = f.read(65536).split(b"\r\n\r\n", 1)[0]
        except OSError:
            continue
        m = re.search(rb"^message-id:\s*(<[^>\r\n]+>)", head, re.I | re.M)
        if m:
            out.add(m.group(1).decode(errors="replace"))
    return out


def account(run, rec, drained, after, sweep, stuck, faults):
    load_end = next((s["t"] for s in run.samples if s["label"] == "end of load"), None)
    # ---- messages
    delivered = {}
    for user, uidl, mid, how in rec.retrieved:
        if mid:
            delivered.setdefault(mid, set()).add((user, uidl))
    sent = {e["msgid"]: e for e in rec.smtp}
    acked = {m for m, e in sent.items() if e["result"] == "acked"}
    queued = spool_msgids(run.spool)
    not_delivered = sorted(m for m in acked if m not in delivered)
    still_spooled = [m for m in not_delivered if m in queued]
    lost = [m for m in not_delivered if m not in queued]
    dups = {m: len(v) for m, v in delivered.items() if len(v) > 1 and m in sent}
    mdup = sum(v for _, v in (after.get("metrics") or {}).get("oxbridge_spool_possible_duplicates_total") or [])
    dup_rows = []
    for m, n in sorted(dups.items()):
        path = sent[m]["path"]
        if path == "spool" and mdup:
            cause = f"the spool sent it again after a restart ({mdup:.0f} counted as possible duplicates)"
        elif path == "spool":
            cause = "the spool sent it twice, and counted no possible duplicate"
        else:
            cause = f"unknown (a {path} session: the device sent it once)"
        dup_rows.append({"msgid": m, "path": path, "copies": n, "cause": cause})
    by_path = {}
    for e in rec.smtp:
        p = by_path.setdefault(e["path"], {"sent": 0, "acked": 0, "refused": 0, "unknown": 0, "not sent": 0,
                                           "delivered": 0, "not_delivered": 0})
        p["sent"] += 1
        p[e["result"]] += 1
        if e["result"] == "acked":
            p["delivered" if e["msgid"] in delivered else "not_delivered"] += 1
    unacked_delivered = sorted(m for m, e in sent.items() if e["result"] != "acked" and m in delivered)
    # ---- IMAP devices: every append seen
    imap = {}
    for name, st in rec.imap.items():
        want = rec.appended.get(st["folder"], 0)
        got = st["final_exists"]
        imap[name] = dict(st, appended=want, missed=None if got is None else max(0, want - got))
    # ---- errors by kind
    kinds = {}
    for e in rec.errors:
        k = (e["kind"], e["protocol"], e["excused"] or "")
        r = kinds.setdefault(k, {"kind": e["kind"], "protocol_reply": e["protocol"], "excused": e["excused"],
                                 "count": 0, "devices": set(), "example": e["line"], "stage": e["stage"]})
        r["count"] += 1
        r["devices"].add(e["device"])
    err_rows = sorted(({**r, "devices": sorted(r["devices"])} for r in kinds.values()),
                      key=lambda r: (r["protocol_reply"], -r["count"]))
    nonproto = [e for e in rec.errors if not e["protocol"] and not e["excused"]]
    accepted = [e for e in rec.errors if e["kind"] == "accepted"]
    # ---- memory and descriptors
    under = [s for s in run.samples if load_end is None or s["t"] <= load_end]
    warm = (load_end or 0) * WARMUP
    after_warm = [s for s in under if s["t"] >= warm]
    pick = lambda lab: next((s for s in run.samples if s["label"] == lab), None)
    start, middle, end_load, end = pick("start"), pick("middle"), pick("end of load"), pick("end")
    rss_slope = slope_per_min([(s["t"], s["rss_kib"]) for s in after_warm])
    fd_slope = slope_per_min([(s["t"], s["fds"]) for s in after_warm])
    fd_rise = (after_warm[-1]["fds"] - after_warm[0]["fds"]) if len(after_warm) >= 2 and None not in (
        after_warm[-1]["fds"], after_warm[0]["fds"]) else None
    fd_growing = fd_slope is not None and fd_slope > FD_SLOPE_MAX and (fd_rise or 0) >= FD_RISE_MIN
    # ---- after the load
    slots_left = after["slots"]
    throttled = after.get("throttled") or {}
    last = run.samples[-1] if run.samples else {}
    swaps = last.get("swaps")
    refusals = last.get("swap_refusals")
    # ---- verdict
    why = []
    if not_delivered:
        why.append(f"{len(not_delivered)} acknowledged message(s) not delivered "
                   f"({len(still_spooled)} still in oxbridge's spool, {len(lost)} nowhere)")
    if nonproto:
        why.append(f"{len(nonproto)} device error(s) that were not protocol replies")
    if accepted:
        why.append(f"{len(accepted)} login(s) with a wrong password accepted")
    if slots_left is None or slots_left:
        why.append(f"upstream slots after the load: {slots_left!r} (must be none)")
    for key, what in (("slots_held", "upstream slots held (oxbridge_upstream_slots_held)"),
                      ("slots_waiting", "devices waiting for a slot (oxbridge_upstream_slot_waiting)"),
                      ("throttle_checking", "logins in the throttle (oxbridge_throttle_checking)")):
        if after.get(key) not in (0, 0.0):
            why.append(f"{what} after the load: {after.get(key)!r} (must be 0)")
    if after.get("wrong_until") is not None and after.get("throttle_entries") not in (0, 0.0):
        why.append(f"throttle entries (oxbridge_throttle_entries) {after.get('throttle_entries')!r} after the "
                   f"wrong passwords stopped at {after['wrong_until']:.0f} s (must be 0: forgotten after 15 min)")
    if after["sessions_active"] not in (0, 0.0):
        why.append(f"sessions still active after the load: {after['sessions_active']}")
    if throttled.get("busy"):
        why.append(f"{throttled['busy']:.0f} login(s) waited out for a password check place (throttle busy)")
    if fd_growing:
        why.append(f"descriptors kept growing: {fd_slope:+.2f}/min after warm-up, +{fd_rise} under load")
    missed = {n: r["missed"] for n, r in imap.items() if r["missed"] != 0}
    if missed:
        why.append(f"IMAP devices missed appended messages (None: never finished): {missed}")
    if not acked and not run.args.break_postfix:
        why.append("no message was acknowledged at all: the load did not run")
    if stuck:
        why.append(f"devices that did not stop: {stuck}")
    red = after.get("redis") or {}
    if red.get("live_slots") is None and red:
        why.append("Redis slots could not be read after the load")
    elif red and any(red["live_slots"].values()):
        why.append(f"upstream slots still held in Redis after the load: {red['live_slots']}")
    r2 = red.get("replica_2") or {}
    r2_held = (r2.get("held_after") or {}).get("slots_held")
    if r2.get("started") is not None and (r2.get("slots_after") != [] or r2.get("sessions_active_after") != 0
                                          or r2_held not in (0, 0.0)):
        why.append(f"replica 2: slots {r2.get('slots_after')!r}, sessions {r2.get('sessions_active_after')} "
                   "after its devices stopped")
    if r2.get("error"):
        why.append(f"replica 2: {r2['error']}")
    return {
        "verdict": {"pass": not why, "why": why},
        "messages": {"sent": len(sent), "acked": len(acked), "delivered_acked": len(acked) - len(not_delivered),
                     "not_delivered": len(not_delivered), "still_in_spool": len(still_spooled), "lost": len(lost),
                     "lost_ids": lost[:50], "spooled_ids": still_spooled[:50],
                     "delivered_without_250": len(unacked_delivered), "possible_duplicates": dup_rows,
                     "by_path": by_path, "drained": drained, "sweep": sweep},
        "imap": imap, "appended": rec.appended, "append_errors": rec.append_errors[:100],
        "wrong_passwords": rec.wrong,
        "errors": err_rows, "errors_total": len(rec.errors), "errors_nonprotocol": len(nonproto),
        "errors_excused": sum(1 for e in rec.errors if e["excused"]),
        "error_log": rec.errors[:2000],
        "sessions": {"by_device": rec.sessions, "devices_total": sum(rec.sessions.values()),
                     "oxbridge_sessions_total": last.get("sessions_total")},
        "moves": {"swaps": swaps, "refusals": refusals},
        "resources": {
            "rss_kib": {"start": start and start["rss_kib"], "middle": middle and middle["rss_kib"],
                        "end_of_load": end_load and end_load["rss_kib"], "after": end and end["rss_kib"],
                        "slope_kib_per_min": rss_slope},
            "fds": {"start": start and start["fds"], "middle": middle and middle["fds"],
                    "end_of_load": end_load and end_load["fds"], "after": end and end["fds"],
                    "slope_per_min": fd_slope, "rise_after_warmup": fd_rise, "growing": fd_growing,
                    "rule": f"growing = slope > {FD_SLOPE_MAX}/min and rise >= {FD_RISE_MIN} after the first "
                            f"{WARMUP:.0%} of the load"}},
        "after_load": after,
        "faults": [{"name": st["fault"].name, "at_s": st["fault"].at_s, "started": bool(st.get("started")),
                    "stopped": bool(st.get("stopped"))} for st in faults],
        "events": run.events, "samples": run.samples,
    }


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def table(r):
    m, res = r["messages"], r["resources"]
    L = [f"SOAK  {r['config']['minutes']} min, {r['config']['token_ttl_s']}-s tokens, oxbridge "
         f"{r['config']['oxbridge_bin']} (started {r['config']['oxbridge_starts']}x)"
         + ("  [--break-postfix]" if r["config"]["break_postfix"] else ""), ""]
    L.append("messages                 sent  250  delivered  not delivered  other results")
    for path, p in sorted(m["by_path"].items()):
        L.append(f"  smtp {path:<18}{p['sent']:>5}{p['acked']:>5}{p['delivered']:>11}{p['not_delivered']:>15}"
                 f"  refused {p['refused']}, unknown {p['unknown']}, not sent {p['not sent']}")
    L.append(f"  acknowledged {m['acked']}, delivered {m['delivered_acked']}, LOST {m['not_delivered']} "
             f"(still in oxbridge's spool {m['still_in_spool']}, nowhere {m['lost']}); delivered without a 250: "
             f"{m['delivered_without_250']}; possible duplicates: {len(m['possible_duplicates'])}")
    for d in m["possible_duplicates"][:10]:
        L.append(f"    duplicate {d['msgid']} x{d['copies']}: {d['cause']}")
    L.append(f"  at the end: spool {m['drained']['spool']}, Postfix queue {m['drained']['postfix_queue']}, "
             f"Graph queue {m['drained'].get('graph_queue')}; "
             f"INBOX sweep {m['sweep']}")
    L.append("")
    L.append("IMAP devices             appended  final EXISTS  seen live  missed  sessions  BYEs")
    for n, d in sorted(r["imap"].items()):
        L.append(f"  {n:<22}{d['appended']:>9}{fmt(d['final_exists']):>14}{d['live']:>11}{fmt(d['missed']):>8}"
                 f"{d['sessions']:>10}  {d['byes'] or '-'}")
    L.append(f"  session moves {fmt(r['moves']['swaps'])}, refused {fmt(r['moves']['refusals'])}; "
             f"appender errors (direct to Dovecot, not a device) {len(r['append_errors'])}")
    w = r["wrong_passwords"]
    L.append(f"wrong passwords: {w['tried']} tried, {w['refused_as_expected']} got the protocol's failure reply")
    s = r["sessions"]
    L.append(f"sessions served: {s['devices_total']} device logins ({', '.join(f'{k} {v}' for k, v in sorted(s['by_device'].items()))}); "
             f"oxbridge_sessions_total {fmt(s['oxbridge_sessions_total'])}")
    L.append("")
    L.append(f"device errors: {r['errors_total']} ({r['errors_nonprotocol']} not protocol replies, "
             f"{r['errors_excused']} excused: during an oxbridge kill)")
    L.append("  count  protocol reply  kind (stage) [devices] example")
    for e in r["errors"][:40]:
        ex = f" excused: {e['excused']}" if e["excused"] else ""
        L.append(f"  {e['count']:>5}  {'yes' if e['protocol_reply'] else 'NO':<14}  {e['kind']} ({e['stage']}) "
                 f"[{', '.join(e['devices'])}]{ex}  {e['example'][:80]}")
    L.append("")
    rs, fd = res["rss_kib"], res["fds"]
    L.append("resources            start   middle  end of load   after  slope after warm-up")
    L.append(f"  RSS KiB        {fmt(rs['start']):>8} {fmt(rs['middle']):>8} {fmt(rs['end_of_load']):>12} "
             f"{fmt(rs['after']):>7}  {fmt(rs['slope_kib_per_min'], ' KiB/min')}")
    L.append(f"  descriptors    {fmt(fd['start']):>8} {fmt(fd['middle']):>8} {fmt(fd['end_of_load']):>12} "
             f"{fmt(fd['after']):>7}  {fmt(fd['slope_per_min'], '/min')} (rise {fmt(fd['rise_after_warmup'])}; "
             f"{fd['rule']})")
    a = r["after_load"]
    mm = a.get("metrics") or {}

    def by(name, label):
        sums = {}
        for lab, v in mm.get(name) or []:
            sums[lab.get(label, "")] = sums.get(lab.get(label, ""), 0) + v
        return ", ".join(f"{k} {v:.0f}".strip() for k, v in sorted(sums.items()) if v) or "0"
    L.append(f"oxbridge counted: failed logins by reason ({by('oxbridge_auth_failures_total', 'reason')}); "
             f"refusals ({by('oxbridge_refusals_total', 'reason')}); move refusals "
             f"({by('oxbridge_imap_swap_refusals_total', 'reason')}); spool deliveries "
             f"({by('oxbridge_spool_deliveries_total', 'result')}), retries "
             f"{by('oxbridge_spool_retries_total', '')}, possible duplicates "
             f"{by('oxbridge_spool_possible_duplicates_total', '')}")
    L.append(f"after the load: upstream slots {a['slots']!r} (status page), held "
             f"{fmt(a.get('slots_held'))}, waiting {fmt(a.get('slots_waiting'))} (/metrics), sessions active "
             f"{fmt(a['sessions_active'])}, throttled logins by kind {a['throttled']}; throttle: logins being "
             f"checked {fmt(a.get('throttle_checking'))}, entries remembered {fmt(a.get('throttle_entries'))} "
             + (f"({(r['config']['minutes'] * 60 - a['wrong_until']) / 60:.0f} minutes after the last wrong password)"
                if a.get("wrong_until") is not None else "(failed logins are remembered for 15 minutes)"))
    red = a.get("redis")
    if red:
        r2 = red.get("replica_2") or {}
        L.append(f"Redis: live slots after the load {red['live_slots']}, throttle keys {red['throttle_keys']}; "
                 f"replica 2 from {fmt(r2.get('started'))} s to {fmt(r2.get('stopped'))} s: slots after its "
                 f"devices stopped {r2.get('slots_after')!r}, sessions {fmt(r2.get('sessions_active_after'))}, "
                 f"RSS {fmt(r2.get('rss_kib'))} KiB, fds {fmt(r2.get('fds'))}")
    if r["faults"]:
        L.append("faults: " + ", ".join(f"{f['name']}@{f['at_s']:.0f}s" for f in r["faults"]))
    L.append("")
    v = r["verdict"]
    L.append("PASS" if v["pass"] else "FAIL: " + "; ".join(v["why"]))
    return "\n".join(L) + "\n"


SERIES = [("RSS (MiB)", lambda s: s["rss_kib"] / 1024 if s["rss_kib"] is not None else None),
          ("open descriptors", lambda s: s["fds"]),
          ("sessions active", lambda s: s["sessions_active"]),
          ("upstream slots held", lambda s: s.get("slots_held", s["slots"])),
          ("spool depth (messages)", lambda s: s["spool_on_disk"]),
          ("device errors", lambda s: s["device_errors"]),
          ]


def svg(samples, events, w=900, ph=120):
    """One panel per series over time (minutes); fault events as dashed lines."""
    left, right, top, gap = 60, 20, 30, 28
    notes = [f"{ev['t'] / 60:.1f} min {ev['event']}" for ev in events]
    h = top + len(SERIES) * (ph + gap) + 24 + 14 * len(notes)
    tmax = max([s["t"] for s in samples] + [1]) / 60
    X = lambda t: left + (w - left - right) * (t / 60) / tmax
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
         f'<text x="{left}" y="18" font-size="13">oxbridge soak: {tmax:.1f} min</text>']
    for i, (name, f) in enumerate(SERIES):
        y0 = top + i * (ph + gap) + 14
        pts = [(s["t"], f(s)) for s in samples if f(s) is not None]
        extra = [(s["t"], s["device_errors_nonprotocol"]) for s in samples] if i == len(SERIES) - 1 else []
        ys = [y for _, y in pts + extra] or [0]
        lo, hi = min(0, min(ys)), max(ys) or 1
        hi = hi if hi > lo else lo + 1
        Y = lambda v: y0 + ph - (v - lo) / (hi - lo) * ph
        o.append(f'<text x="{left}" y="{y0 - 4}">{html.escape(name)}</text>')
        o.append(f'<rect x="{left}" y="{y0}" width="{w - left - right}" height="{ph}" fill="none" stroke="#ccc"/>')
        o.append(f'<text x="{left - 4}" y="{y0 + 10}" text-anchor="end">{hi:.4g}</text>')
        o.append(f'<text x="{left - 4}" y="{y0 + ph}" text-anchor="end">{lo:.4g}</text>')
        for ev in events:
            x = X(ev["t"])
            o.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + ph}" stroke="#e99" '
                     f'stroke-dasharray="3,3"><title>{html.escape(ev["event"])}</title></line>')
        for series, color in ((pts, "#1f5fbf"), (extra, "#c22")):
            if series:
                p = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in series)
                o.append(f'<polyline points="{p}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if i == len(SERIES) - 1:
            o.append(f'<text x="{left}" y="{y0 + ph + 14}">minutes: 0</text>')
            o.append(f'<text x="{w - right}" y="{y0 + ph + 14}" text-anchor="end">{tmax:.1f}</text>')
            o.append(f'<text x="{w - right}" y="{y0 - 4}" text-anchor="end"><tspan fill="#1f5fbf">all</tspan> / '
                     f'<tspan fill="#c22">not protocol replies</tspan> (cumulative)</text>')
            for k, note in enumerate(notes):
                o.append(f'<text x="{left}" y="{y0 + ph + 32 + 14 * k}" fill="#a55">dashed: '
                         f'{html.escape(note)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


if __name__ == "__main__":  # the table and the plot again from a results.json
    import json
    import sys
    res = json.load(open(sys.argv[1]))
    print(table(res), end="")
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(svg(res["samples"], res["events"]))
