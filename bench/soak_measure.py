"""What the soak reads from a running oxbridge: resident memory and
descriptors from /proc, counters from /metrics, upstream slots from the
status page."""
import os
import time
import urllib.parse
import urllib.request

import soak_report

no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url, data=None, timeout=10):
    body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else data
    with no_proxy.open(url, data=body, timeout=timeout) as r:
        return r.read()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def fds(pid):
    """The fewest descriptors of 5 reads 0.1 s apart: a session that happens to be
    open at one read does not count as growth."""
    seen = []
    for _ in range(5):
        try:
            seen.append(len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass
        time.sleep(0.1)
    return min(seen) if seen else None


def metrics(admin_url):
    """{name: [(labels dict, value)]} from /metrics."""
    out = {}
    try:
        text = http(admin_url + "/metrics", timeout=5).decode()
    except OSError:
        return None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        lab = {}
        for part in labels.rstrip("}").split('",'):
            if "=" in part:
                k, v = part.split("=", 1)
                lab[k.strip(",")] = v.strip('"')
        try:
            out.setdefault(name, []).append((lab, float(value)))
        except ValueError:
            pass
    return out


def msum(m, name, **want):
    if not m:
        return None
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in want.items()))


def held(m):
    """What /metrics says the per-mailbox limits and the throttle hold now."""
    return {"slots_held": msum(m, "oxbridge_upstream_slots_held"),
            "slots_waiting": msum(m, "oxbridge_upstream_slot_waiting"),
            "throttle_entries": msum(m, "oxbridge_throttle_entries"),
            "throttle_checking": msum(m, "oxbridge_throttle_checking")}


def slots(admin_url):
    """Rows of the status page's "Upstream sessions per mailbox": (mailbox, protocol, sessions, waiting)."""
    try:
        page = http(admin_url + "/", timeout=5).decode()
    except OSError:
        return None
    return soak_report.parse_slots(page)
