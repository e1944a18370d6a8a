#!/usr/bin/env python3
"""Checks of the recipes in deploy/ that no off-the-shelf linter makes.

Called by deploy/lint (which provides PyYAML in its venv); each check prints
one line, `OK   name: detail` or `FAIL name: why`, and the exit status is the
number of failures (capped at 100).

  lint-recipes.py dockerfile              Dockerfile <-> Dockerfile.dockerignore, paths
  lint-recipes.py cargo-command           print the Dockerfile's `cargo build` line
  lint-recipes.py context DIR             copy what the builder stage COPYs into DIR
  lint-recipes.py compose                 docker-compose.yml <-> compose/oxbridge.toml
  lint-recipes.py kubernetes              every manifest <-> its embedded oxbridge.toml
  lint-recipes.py configs OUT_DIR         write every oxbridge config with local stand-ins
                                          for the files it names (for `oxbridge check`)
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
BINARY = "/usr/local/bin/oxbridge"
CONFIG_PATH = "/etc/oxbridge/oxbridge.toml"
STATE_DIR = "/var/lib/oxbridge"

failures = 0


def ok(name: str, detail: str) -> None:
    print(f"OK   {name}: {detail}")


def fail(name: str, problems: list[str]) -> None:
    global failures
    failures += 1
    print(f"FAIL {name}: " + "; ".join(problems))


def report(name: str, problems: list[str], detail: str) -> None:
    if problems:
        fail(name, problems)
    else:
        ok(name, detail)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def builder_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the first stage (the builder)."""
    stage: list[tuple[str, str]] = []
    seen_from = False
    for ins, args in instructions:
        if ins == "FROM":
            if seen_from:
                break
            seen_from = True
        stage.append((ins, args))
    return stage


def context_copies(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """COPY instructions of the builder stage that take from the build context."""
    copies = []
    for ins, args in builder_stage(instructions):
        if ins not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def cargo_command(instructions: list[tuple[str, str]]) -> str:
    for ins, args in builder_stage(instructions):
        if ins != "RUN":
            continue
        m = re.search(r"((?:[A-Z_][A-Z0-9_]*=\S+\s+)*cargo\s+build\b[^&;|]*)", args)
        if m:
            return " ".join(m.group(1).split())
    raise SystemExit("deploy/Dockerfile: no RUN with `cargo build` in the builder stage")


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes.
    A path is also matched by a pattern matching one of its parents."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            included = neg
    return included


def check_dockerfile() -> None:
    name = "dockerfile: context, entrypoint, healthcheck, volumes"
    dockerfile = DEPLOY / "Dockerfile"
    ignore = DEPLOY / "Dockerfile.dockerignore"
    ins = dockerfile_instructions(dockerfile)
    problems: list[str] = []
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    copied = []
    for sources, _dest in context_copies(ins):
        for src in sources:
            copied.append(src)
            if not (REPO / src).exists():
                problems.append(f"COPY {src}: not in the repository")
            elif not dockerignore_allows(patterns, src):
                problems.append(f"COPY {src}: excluded by {ignore.name}")
    if not copied:
        problems.append("the builder stage COPYs nothing from the context")
    for heavy in ("target", ".git"):
        if dockerignore_allows(patterns, heavy):
            problems.append(f"{ignore.name} lets {heavy}/ into the context")
    by = {}
    for i, a in ins:
        by.setdefault(i, []).append(a)
    entry = by.get("ENTRYPOINT", [""])[-1]
    if entry != f'["{BINARY}"]':
        problems.append(f"ENTRYPOINT is {entry!r}, want [\"{BINARY}\"]")
    health = by.get("HEALTHCHECK", [""])[-1]
    if f'CMD ["{BINARY}", "healthcheck"]' not in health:
        problems.append("HEALTHCHECK must run `oxbridge healthcheck` (exec form)")
    volumes = " ".join(by.get("VOLUME", []))
    for v in ("/etc/oxbridge", STATE_DIR):
        if f'"{v}"' not in volumes:
            problems.append(f"VOLUME {v} missing")
    user = by.get("USER", ["root"])[-1].split(":")[0]
    if user in ("root", "0"):
        problems.append("the final stage runs as root")
    if not any(f" {BINARY}" in a for i, a in ins if i == "COPY"):
        problems.append(f"no COPY puts the binary at {BINARY}")
    report(name, problems, f"COPY {' '.join(copied)} pass {ignore.name}; USER {user}; "
           f"cargo: {cargo_command(ins)}")


def make_context(out: Path) -> None:
    """Recreate `out` with exactly what the builder stage COPYs (mtimes kept,
    so that cargo sees unchanged sources as unchanged on the next run)."""
    ins = dockerfile_instructions(DEPLOY / "Dockerfile")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sources, dest in context_copies(ins):
        into_dir = dest.endswith("/") or dest == "." or len(sources) > 1
        for src in sources:
            s = REPO / src
            target = out / dest / s.name if into_dir else out / dest
            if s.is_dir():
                # COPY copies a directory's contents
                shutil.copytree(s, out / dest, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, target)


# ---------------------------------------------------------------- configs


def load_toml(text: str, source: str) -> tuple[dict | None, str | None]:
    try:
        return tomllib.loads(text), None
    except tomllib.TOMLDecodeError as e:
        return None, f"{source}: not TOML: {e}" if source else f"not TOML: {e}"


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def drain_s(cfg: dict) -> int:
    return int(cfg.get("limits", {}).get("drain_s", 30))


def file_keys(cfg: dict) -> list[tuple[str, str]]:
    """(key, path) of every file the config names."""
    out = []
    oauth = cfg.get("oauth", {})
    for k in ("client_secret_file", "client_certificate_file"):
        if k in oauth:
            out.append((f"oauth.{k}", oauth[k]))
    if "ca_file" in cfg.get("upstream", {}):
        out.append(("upstream.ca_file", cfg["upstream"]["ca_file"]))
    if "token_file" in cfg.get("admin", {}):
        out.append(("admin.token_file", cfg["admin"]["token_file"]))
    for i, l in enumerate(cfg.get("listener", [])):
        for k in ("cert_file", "key_file"):
            if k in l:
                out.append((f"listener[{i}].{k}", l[k]))
    if "key_file" in cfg.get("store", {}):
        out.append(("store.key_file", cfg["store"]["key_file"]))
    return out


def common_config_problems(cfg: dict) -> list[str]:
    problems = []
    if "admin" not in cfg or "listen" not in cfg.get("admin", {}):
        problems.append("[admin] listen missing (health checks and probes need it)")
    if not cfg.get("listener"):
        problems.append("no [[listener]]")
    if cfg.get("state_dir", STATE_DIR) != STATE_DIR:
        problems.append(f"state_dir is not {STATE_DIR}")
    return problems


# ---------------------------------------------------------------- compose


def check_compose() -> None:
    path = DEPLOY / "docker-compose.yml"
    name = f"compose: {rel(path)} wiring"
    problems: list[str] = []
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services", {})
    ox = services.get("oxbridge")
    app = services.get("app")
    if ox is None or app is None:
        fail(name, ["services oxbridge and app are both needed"])
        return
    build = ox.get("build", {})
    context = (path.parent / build.get("context", ".")).resolve()
    if context != REPO:
        problems.append(f"build.context is {context}, want the repository root")
    if not (context / build.get("dockerfile", "Dockerfile")).is_file():
        problems.append("build.dockerfile does not exist")

    # config file and state volume
    config_file = None
    state_volume = None
    for v in ox.get("volumes", []):
        src, dst = v.split(":")[:2]
        if dst == CONFIG_PATH:
            config_file = (path.parent / src).resolve()
        if dst == STATE_DIR:
            state_volume = src
    cfg = None
    if config_file is None or not config_file.is_file():
        problems.append(f"no existing file mounted at {CONFIG_PATH}")
    else:
        cfg, err = load_toml(config_file.read_text(), rel(config_file))
        if err:
            problems.append(err)
    if state_volume is None or state_volume not in (doc.get("volumes") or {}):
        problems.append(f"no named volume (declared under volumes:) at {STATE_DIR}")
    if ox.get("read_only") is not True:
        problems.append("oxbridge should run with read_only: true")
    if "ALL" not in (ox.get("cap_drop") or []):
        problems.append("oxbridge should cap_drop ALL")

    # secrets
    secrets_top = doc.get("secrets") or {}
    secret_paths = {}
    for s in ox.get("secrets", []):
        sname = s if isinstance(s, str) else s.get("source")
        target = f"/run/secrets/{sname}" if isinstance(s, str) else s.get("target", f"/run/secrets/{sname}")
        if not target.startswith("/"):
            target = f"/run/secrets/{target}"
        if sname not in secrets_top or "file" not in (secrets_top[sname] or {}):
            problems.append(f"secret {sname} is not declared at top level with file:")
        secret_paths[target] = sname
        secret_file = secrets_top.get(sname, {}).get("file", "")
        gitignore = (path.parent / secret_file).parent / ".gitignore"
        if secret_file and not (
            gitignore.is_file() and Path(secret_file).name in gitignore.read_text().split()
        ):
            problems.append(f"{secret_file} is not listed in {rel(gitignore)} (a secret must not be committed)")

    # networks
    nets_top = doc.get("networks") or {}
    internal = {n for n, d in nets_top.items() if (d or {}).get("internal") is True}
    app_nets = set(app.get("networks") or [])
    ox_nets = set(ox.get("networks") or [])
    if not app_nets or not app_nets <= internal:
        problems.append("app must be on internal networks only")
    if not (app_nets & ox_nets & internal):
        problems.append("app and oxbridge share no internal network")
    if not (ox_nets - internal):
        problems.append("oxbridge has no network with a route out (Exchange Online)")
    if "oxbridge" not in (app.get("depends_on") or {}):
        problems.append("app should depend on oxbridge")
    elif (app["depends_on"]["oxbridge"] or {}).get("condition") != "service_healthy":
        problems.append("app should wait for oxbridge: condition service_healthy")

    if cfg is not None:
        problems += common_config_problems(cfg)
        csf = cfg.get("oauth", {}).get("client_secret_file")
        if csf not in secret_paths:
            problems.append(f"oauth.client_secret_file {csf!r} is not a compose secret's path "
                            f"({', '.join(secret_paths) or 'none'})")
        ports = {host_port(l["listen"])[1]: l for l in cfg.get("listener", [])}
        app_port = int((app.get("environment") or {}).get("SMTP_PORT", 0))
        if app_port not in ports:
            problems.append(f"app's SMTP_PORT {app_port} is no listener's port")
        published = {str(p).split(":")[-1].split("/")[0] for p in ox.get("ports", [])}
        for port, l in ports.items():
            if l.get("tls") == "none" and str(port) in published:
                problems.append(f"plaintext listener :{port} must not be published")
        grace = str(ox.get("stop_grace_period", "10s"))
        if int(grace.rstrip("s")) < drain_s(cfg) + 5:
            problems.append(f"stop_grace_period {grace} < drain_s + 5")
    report(name, problems, f"services oxbridge+app, secret at {', '.join(secret_paths)}, "
           f"app on internal {', '.join(sorted(app_nets))}, config {rel(config_file)}")


# ---------------------------------------------------------------- kubernetes


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def object_data(d: dict) -> dict:
    """The string data of a ConfigMap (data) or a Secret (stringData)."""
    if d.get("kind") == "ConfigMap":
        return d.get("data") or {}
    if d.get("kind") == "Secret":
        return d.get("stringData") or {}
    return {}


def embedded_configs(path: Path) -> list[tuple[str, str]]:
    """(source name, TOML text) of every *.toml in a ConfigMap or Secret of the file."""
    out = []
    for d in k8s_docs(path):
        for key, text in object_data(d).items():
            if key.endswith(".toml"):
                out.append((f"{rel(path)}:{d['kind'].lower()}/{d['metadata']['name']}/{key}", text))
    return out


def pod_templates(docs: list[dict]):
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]


def volume_file(vol: dict, relpath: str, objects: dict) -> tuple[bool, str]:
    """Does volume `vol` provide the file `relpath`? (yes/no, what)"""
    for kind, ref_key, store in (("configMap", "name", "ConfigMap"), ("secret", "secretName", "Secret")):
        if kind in vol:
            src = vol[kind]
            name = src.get(ref_key)
            items = src.get("items")
            if items:
                keys = {i["path"]: i["key"] for i in items}
                if relpath not in keys:
                    return False, f"{kind} {name} has no item with path {relpath}"
                relpath_key = keys[relpath]
            else:
                relpath_key = relpath
            obj = objects.get((store, name))
            if obj is None:
                # created outside this file (kubectl create secret ...)
                return "/" not in relpath_key, f"{store.lower()} {name} (created separately) key {relpath_key}"
            data = {**(obj.get("data") or {}), **(obj.get("stringData") or {})}
            if relpath_key not in data:
                return False, f"{store} {name} has no key {relpath_key}"
            return True, f"{store.lower()} {name} key {relpath_key}"
    return False, f"volume {vol.get('name')} is neither a configMap nor a secret"


def mount_for(container: dict, volumes: dict, path: str):
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return None, None, None
    mp = best["mountPath"].rstrip("/")
    relpath = best.get("subPath") or path[len(mp) + 1:]
    return best, volumes.get(best["name"]), relpath


def check_kubernetes(path: Path) -> None:
    docs = k8s_docs(path)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    found = False
    for workload, template in pod_templates(docs):
        spec = template["spec"]
        containers = spec.get("containers", []) + spec.get("initContainers", [])
        for c in containers:
            if "oxbridge" not in c.get("image", ""):
                continue
            found = True
            name = f"kubernetes: {rel(path)} {workload['kind'].lower()}/{workload['metadata']['name']} container {c['name']}"
            problems: list[str] = []
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            args = c.get("args", [])
            config_path = args[args.index("--config") + 1] if "--config" in args else CONFIG_PATH

            if c in spec.get("initContainers", []) and c.get("restartPolicy") != "Always":
                problems.append("an oxbridge init container must be a sidecar (restartPolicy: Always)")

            # security
            psc = spec.get("securityContext") or {}
            csc = c.get("securityContext") or {}
            if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                problems.append("runAsNonRoot is not true")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append("readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append("allowPrivilegeEscalation is not false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append("capabilities do not drop ALL")
            if (csc.get("capabilities") or {}).get("add"):
                problems.append("capabilities are added")
            res = c.get("resources") or {}
            if not (res.get("requests") and (res.get("limits") or {}).get("memory")):
                problems.append("resources need requests and a memory limit")

            # config
            mount, vol, relpath = mount_for(c, volumes, config_path)
            cfg = None
            if mount is None or vol is None:
                problems.append(f"nothing is mounted at {config_path}")
            else:
                good, what = volume_file(vol, relpath, objects)
                source = (
                    ("ConfigMap", vol["configMap"]["name"]) if "configMap" in vol
                    else ("Secret", vol["secret"]["secretName"]) if "secret" in vol
                    else None
                )
                if not good or source not in objects:
                    problems.append(f"{config_path}: {what} (the config must be in this file)")
                else:
                    obj = objects[source]
                    key = what.rsplit(" ", 1)[-1]
                    cfg, err = load_toml(object_data(obj)[key], f"{source[0].lower()}/{source[1]}/{key}")
                    if err:
                        problems.append(err)
            if cfg is None:
                report(name, problems or ["no config"], "")
                continue
            problems += common_config_problems(cfg)

            # every file the config names comes from a mounted volume with that key
            for key, fpath in file_keys(cfg):
                m, v, rp = mount_for(c, volumes, fpath)
                if m is None or v is None:
                    problems.append(f"{key} {fpath}: not under any volumeMount")
                    continue
                good, what = volume_file(v, rp, objects)
                if not good:
                    problems.append(f"{key} {fpath}: {what}")

            # state_dir is writable
            sd = cfg.get("state_dir", STATE_DIR)
            m, v, _ = mount_for(c, volumes, sd)
            if m is None or v is None or m.get("readOnly") or not (
                "emptyDir" in v or "persistentVolumeClaim" in v
            ):
                problems.append(f"state_dir {sd} needs a writable emptyDir or PVC mount")
            if any(a.get("grant") == "refresh_token" for a in cfg.get("account", [])) and (
                v is None or "persistentVolumeClaim" not in v
            ):
                problems.append("refresh_token accounts need state_dir on a PersistentVolumeClaim")

            # ports and probes
            cports = {p["containerPort"]: p for p in c.get("ports", [])}
            named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            admin_host, admin_port = host_port(cfg.get("admin", {}).get("listen", "127.0.0.1:0"))
            if is_loopback(admin_host):
                problems.append("[admin] listen is loopback: the kubelet's probes cannot reach it")
            for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                hg = (c.get(probe) or {}).get("httpGet")
                if not hg:
                    problems.append(f"{probe} is not an httpGet")
                    continue
                port = named.get(hg["port"], hg["port"])
                if hg.get("path") != want:
                    problems.append(f"{probe} path {hg.get('path')} is not {want}")
                if port != admin_port:
                    problems.append(f"{probe} port {port} is not [admin] listen's {admin_port}")
            listeners = []
            for i, l in enumerate(cfg.get("listener", [])):
                host, port = host_port(l["listen"])
                listeners.append(f"{l['protocol']}:{port}")
                if port < 1024:
                    problems.append(f"listener[{i}] port {port} < 1024 needs a capability; all are dropped")
                if not is_loopback(host) and port not in cports:
                    problems.append(f"listener[{i}] port {port} has no containerPort")
                if not is_loopback(host) and l.get("tls") == "none" and l.get("allow_plaintext_auth"):
                    problems.append(f"listener[{i}] takes plaintext passwords on the Pod network")
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace < drain_s(cfg) + 5:
                problems.append(f"terminationGracePeriodSeconds {grace} < drain_s + 5")

            # Services that select this Pod reach container ports
            labels = template["metadata"].get("labels", {})
            services = []
            for d in docs:
                if d.get("kind") != "Service":
                    continue
                sel = d["spec"].get("selector", {})
                if sel and all(labels.get(k) == v for k, v in sel.items()):
                    for p in d["spec"]["ports"]:
                        tp = p.get("targetPort", p["port"])
                        tp = named.get(tp, tp)
                        if tp not in cports:
                            problems.append(f"service/{d['metadata']['name']} port {p['port']} -> {tp}: no such containerPort")
                        services.append(f"{p['port']}->{tp}")
            report(name, problems,
                   f"config {config_path} from its ConfigMap or Secret, {len(file_keys(cfg))} files from volumes, "
                   f"listeners {' '.join(listeners)}, probes on :{admin_port}"
                   + (f", service {' '.join(services)}" if services else ""))
    if not found:
        fail(f"kubernetes: {rel(path)}", ["no container with an oxbridge image"])


# ---------------------------------------------------------------- configs


def write_configs(out: Path) -> None:
    """Every oxbridge config in deploy/, with the files it names replaced by
    local stand-ins in out/files (made by deploy/lint: cert.pem, key.pem,
    secret), so that `oxbridge check --offline` judges the config, not this
    machine. Prints `name<TAB>file` per config."""
    files = out / "files"
    sources = [(rel(DEPLOY / "compose/oxbridge.toml"), (DEPLOY / "compose/oxbridge.toml").read_text())]
    for manifest in sorted((DEPLOY / "kubernetes").glob("*.y*ml")):
        sources += embedded_configs(manifest)
    for n, (source, text) in enumerate(sources):
        cfg, err = load_toml(text, source)
        if err:
            print(f"{source}\t-")
            continue
        stand_in = {
            "oauth.client_secret_file": files / "secret",
            "admin.token_file": files / "secret",
            "oauth.client_certificate_file": files / "cert-and-key.pem",
            "upstream.ca_file": files / "cert.pem",
            "store.key_file": files / "store.key",
        }
        for key, fpath in file_keys(cfg):
            kind = key.rsplit(".", 1)[-1]
            repl = stand_in.get(key) or files / ("cert.pem" if kind == "cert_file" else "key.pem")
            text = text.replace(f'"{fpath}"', f'"{repl}"')
        state = out / f"state{n}"
        state.mkdir(exist_ok=True)
        text = text.replace(f'"{cfg.get("state_dir", STATE_DIR)}"', f'"{state}"')
        dest = out / f"config{n}.toml"
        dest.write_text(text)
        print(f"{source}\t{dest}")


def check_toml_parse() -> None:
    sources = [(rel(DEPLOY / "compose/oxbridge.toml"), (DEPLOY / "compose/oxbridge.toml").read_text())]
    for manifest in sorted((DEPLOY / "kubernetes").glob("*.y*ml")):
        sources += embedded_configs(manifest)
    for source, text in sources:
        cfg, err = load_toml(text, "")
        if err:
            fail(f"toml: {source}", [err])
        else:
            problems = common_config_problems(cfg)
            report(f"toml: {source}", problems,
                   f"{len(cfg.get('listener', []))} listener(s), {len(cfg.get('account', []))} account(s)")


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "dockerfile":
        check_dockerfile()
    elif cmd == "cargo-command":
        print(cargo_command(dockerfile_instructions(DEPLOY / "Dockerfile")))
    elif cmd == "context":
        make_context(Path(sys.argv[2]))
    elif cmd == "compose":
        check_compose()
    elif cmd == "toml":
        check_toml_parse()
    elif cmd == "kubernetes":
        for manifest in sorted((DEPLOY / "kubernetes").glob("*.y*ml")):
            check_kubernetes(manifest)
    elif cmd == "configs":
        write_configs(Path(sys.argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
