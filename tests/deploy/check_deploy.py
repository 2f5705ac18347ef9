#!/usr/bin/env python3
"""Checks of the deploy/ files, run by ctest (label deploy):

  rules      promtool check/test rules; every alert has a unit test firing and not
             firing, a runbook_url whose anchor is a README heading, and uses only
             metrics the worker exports (or RabbitMQ's plugin); the tests' input series
             use only label values the worker exports
  dashboard  every PromQL expression of the Grafana dashboard (variables substituted)
             parsed by promtool as a recording rule, then evaluated by promtool over
             series made from the worker's own exposition (tests/deploy/metrics_sample.c):
             each must return data; the panels an on-call engineer needs are there
  k8s        every manifest parses; every IW_ variable is a setting that
             `integration-worker --help` lists; roles, queues, ports, probes, grace
             period, security context, PDBs and KEDA targets agree; KEDA's PromQL parses;
             `kubectl kustomize` renders when kubectl is installed
  rabbitmq   definitions.json: the worker user's regexes cover every name of the
             namespace and nothing else; guest unchanged
  redis      users.acl loads into a private redis-server; it grants every command the
             worker and its Lua scripts use, and no more key space than N:*

Exit 0 ok, 1 failure, 77 skipped (a required tool is not installed).
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SKIP = 77
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL: " + msg, file=sys.stderr)


def need(tool):
    path = shutil.which(tool)
    if not path:
        print("SKIP: %s is not installed (scripts/setup.sh installs it)" % tool)
        sys.exit(SKIP)
    return path


def load_yaml_all(path):
    import yaml  # python3-yaml (Debian)

    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def exported_metrics(src):
    """Metric families that common/metrics.c renders, with histogram series names."""
    text = open(os.path.join(src, "common/metrics.c")).read()
    names = set()
    for name, kind in re.findall(r'head\(o, "(iw_[a-z_]+)", "([a-z]+)"', text):
        names.add(name)
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    if len(names) < 20:
        fail("could not read the metric families from common/metrics.c (%d found)" % len(names))
    return names


# RabbitMQ's rabbitmq_prometheus plugin (per-object metrics) names used by rules/dashboard.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
}


def check_metric_names(where, expr, exported):
    for name in re.findall(r"\b((?:iw|rabbitmq)_[a-z_]+)\b", expr):
        if name.startswith("iw_") and name not in exported:
            fail("%s uses %s, which the worker does not export" % (where, name))
        if name.startswith("rabbitmq_") and name not in RABBITMQ_METRICS:
            fail("%s uses %s, not among the RabbitMQ metrics we rely on" % (where, name))


def promtool_check_exprs(exprs, what):
    """Parses each PromQL expression with promtool as a recording rule."""
    import yaml

    promtool = need("promtool")
    rules = [{"record": "check:expr_%d" % i, "expr": e} for i, (_, e) in enumerate(exprs)]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": what, "rules": rules}]}, f)
        path = f.name
    try:
        r = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
        if r.returncode != 0:
            fail("promtool rejects a %s expression:\n%s%s" % (what, r.stdout, r.stderr))
            # name the culprit(s): check them one by one
            for where, e in exprs:
                with open(path, "w") as f:
                    yaml.safe_dump({"groups": [{"name": what, "rules": [
                        {"record": "check:one", "expr": e}]}]}, f)
                one = subprocess.run([promtool, "check", "rules", path], capture_output=True,
                                     text=True)
                if one.returncode != 0:
                    fail("%s: %s" % (where, e))
        else:
            print("promtool parsed %d %s expressions" % (len(exprs), what))
    finally:
        os.unlink(path)


def parse_labels(text):
    return dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', text or ""))


def sample_exposition(args):
    """(name, labels, value) of every sample of metrics_sample's exposition."""
    if not args.sample:
        fail("--sample (the metrics_sample program) is required")
        return []
    out = subprocess.run([args.sample], capture_output=True, text=True, check=True).stdout
    samples = []
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m:
            fail("metrics_sample printed a malformed line: " + line)
            continue
        samples.append((m.group(1), parse_labels(m.group(2)), float(m.group(3))))
    return samples


def check_exprs_return_data(exprs, args, what):
    """Evaluates each expression with promtool over series made from the worker's own
    exposition (plus RabbitMQ's queue metrics) and fails those that return nothing: a
    metric, label or label value the worker does not export shows up here."""
    import yaml

    promtool = need("promtool")
    series = []
    for name, labels, value in sample_exposition(args):
        labels = dict(labels, job="integration-worker", pod="p1")
        sel = name + "{" + ",".join('%s="%s"' % kv for kv in sorted(labels.items())) + "}"
        counter = name.endswith(("_total", "_bucket", "_sum", "_count"))
        v = value if value > 0 else 0
        series.append({"series": sel,
                       "values": ("0+%gx30" % v) if counter else ("%gx30" % v)})
    for q in ("submit", "status", "resource", "dead"):
        for n in ("rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked",
                  "rabbitmq_queue_messages"):
            series.append({"series": '%s{vhost="/",queue="ext-api.%s"}' % (n, q),
                           "values": "5x30"})
    series.append({"series": 'rabbitmq_queue_messages{vhost="/",queue="ext-api.delay.1000"}',
                   "values": "2x30"})
    rules = [{"alert": "Empty%d" % i, "expr": "absent(%s)" % e} for i, (_, e) in enumerate(exprs)]
    tmp = tempfile.mkdtemp(prefix="iw-%s-" % what)
    try:
        with open(os.path.join(tmp, "rules.yml"), "w") as f:
            yaml.safe_dump({"groups": [{"name": what, "rules": rules}]}, f)
        with open(os.path.join(tmp, "test.yml"), "w") as f:
            yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                            "tests": [{"interval": "1m", "input_series": series,
                                       "alert_rule_test": [
                                           {"eval_time": "20m", "alertname": "Empty%d" % i,
                                            "exp_alerts": []} for i in range(len(exprs))]}]}, f)
        r = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp, capture_output=True,
                           text=True)
        if r.returncode != 0:
            empty = sorted({int(n) for n in re.findall(r"alertname: Empty(\d+)", r.stdout + r.stderr)})
            for i in empty:
                fail("%s returns no data over the worker's exposition: %s" % exprs[i])
            if not empty:
                fail("promtool test rules failed:\n" + r.stdout + r.stderr)
        else:
            print("all %d %s expressions return data over the worker's own exposition"
                  % (len(exprs), what))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_test_series_are_real(tests, args):
    """Every iw_ series an alert test feeds uses label names and values the worker exports
    (error codes: any code; pod/job/instance are the scraper's)."""
    exported = {}
    for name, labels, _ in sample_exposition(args):
        for k, v in labels.items():
            exported.setdefault((name, k), set()).add(v)
    for t in tests["tests"]:
        for s in t.get("input_series", []):
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$", s["series"].strip())
            name, labels = m.group(1), parse_labels(m.group(2))
            if not name.startswith("iw_"):
                continue
            if not any(n == name for n, _ in exported) and not any(
                    n == name for n, _, _ in sample_exposition(args)):
                fail("test %r feeds %s, which the worker does not export" % (t["name"], name))
                continue
            for k, v in labels.items():
                if k in ("pod", "job", "instance"):
                    continue
                if k == "code" and name == "iw_dead_letters_total" and re.fullmatch(r"[A-Z][A-Z0-9_]*", v):
                    continue
                if v not in exported.get((name, k), set()):
                    fail("test %r feeds %s{%s=%r}: the worker exports no such label value"
                         % (t["name"], name, k, v))


def readme_anchors(src):
    """GitHub's anchors of the README's headings."""
    anchors = set()
    for line in open(os.path.join(src, "README.md")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# ---------------------------------------------------------------------------- rules

def check_rules(args):
    promtool = need("promtool")
    d = os.path.join(args.source, "deploy/prometheus")
    for cmd in (["check", "rules", "rules.yml"], ["test", "rules", "rules_test.yml"]):
        r = subprocess.run([promtool] + cmd, cwd=d, capture_output=True, text=True)
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            fail("promtool %s failed" % " ".join(cmd))
    exported = exported_metrics(args.source)
    anchors = readme_anchors(args.source)
    rules = load_yaml_all(os.path.join(d, "rules.yml"))[0]
    tests = load_yaml_all(os.path.join(d, "rules_test.yml"))[0]
    check_test_series_are_real(tests, args)
    fired, quiet = set(), set()
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    if len(alerts) < 7:
        fail("expected at least 7 alerts, found %d" % len(alerts))
    for r in alerts:
        name = r["alert"]
        check_metric_names("alert " + name, r["expr"], exported)
        if name not in fired:
            fail("alert %s has no test where it fires" % name)
        if name not in quiet:
            fail("alert %s has no test where it stays quiet" % name)
        url = r.get("annotations", {}).get("runbook_url", "")
        m = re.match(r"^README\.md#(runbook-[a-z0-9-]+)$", url)
        if not m:
            fail("alert %s: runbook_url %r is not README.md#runbook-..." % (name, url))
        elif m.group(1) not in anchors:
            fail("alert %s: README.md has no heading for #%s" % (name, m.group(1)))
        if r.get("labels", {}).get("severity") not in ("critical", "warning"):
            fail("alert %s: severity must be critical or warning" % name)
    print("%d alerts, each tested firing and quiet, runbook anchors present" % len(alerts))


# ---------------------------------------------------------------------------- dashboard

DASH_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "${datasource}": "x", "$job": ".+",
             "$ns": "ext-api"}


def check_dashboard(args):
    path = os.path.join(args.source, "deploy/grafana/integration-worker.json")
    dash = json.load(open(path))
    exported = exported_metrics(args.source)
    exprs, titles = [], set()
    for p in dash["panels"]:
        if p.get("type") == "row":
            continue
        if p["title"] in titles:
            fail("two panels are titled %r" % p["title"])
        titles.add(p["title"])
        if not p.get("targets"):
            fail("panel %r has no query" % p["title"])
        for t in p.get("targets", []):
            e = t.get("expr", "")
            if not e.strip():
                fail("panel %r: empty expression" % p["title"])
                continue
            for k, v in DASH_VARS.items():
                e = e.replace(k, v)
            if "$" in e:
                fail("panel %r: unknown variable in %s" % (p["title"], e))
            check_metric_names("panel %r" % p["title"], e, exported)
            exprs.append(("panel %r" % p["title"], e))
    all_text = "\n".join(e for _, e in exprs)
    for must, what in [("iw_jobs_total", "outcomes by role"),
                       ("histogram_quantile(0.5,", "latency p50"),
                       ("histogram_quantile(0.95,", "latency p95"),
                       ("histogram_quantile(0.99,", "latency p99"),
                       ('code=~"5xx|timeout|error"', "error rate"),
                       ("iw_breaker_state", "breaker state"),
                       ("iw_provider_down", "API down"),
                       ("iw_limiter_usage_ratio", "limiter usage per tier"),
                       ("rabbitmq_queue_messages_ready", "queue depths"),
                       ("iw_dead_letters_total", "dead letters by code")]:
        if must not in all_text:
            fail("the dashboard lacks %s (%s)" % (what, must))
    var_names = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for v in ("datasource", "job", "ns"):
        if v not in var_names:
            fail("dashboard variable $%s is used but not defined" % v)
    promtool_check_exprs(exprs, "dashboard")
    check_exprs_return_data(exprs, args, "dashboard")
    print("%d panels, %d expressions" % (len(titles), len(exprs)))


# ---------------------------------------------------------------------------- k8s

def worker_settings(worker):
    out = subprocess.run([worker, "--help"], capture_output=True, text=True)
    names = set(re.findall(r"^\s+(IW_[A-Z0-9_]+)\s", out.stdout + out.stderr, re.M))
    if len(names) < 20:
        fail("could not read the settings from `%s --help` (%d found)" % (worker, len(names)))
    return names


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        fail("cannot read duration %r" % text)
        return 0
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def check_k8s(args):
    d = os.path.join(args.source, "deploy/k8s")
    settings = worker_settings(args.worker)
    docs = []
    for f in sorted(os.listdir(d)):
        if f.endswith((".yaml", ".yml")):
            try:
                for doc in load_yaml_all(os.path.join(d, f)):
                    docs.append((f, doc))
            except Exception as e:  # noqa: BLE001 - any parse error is a failure
                fail("%s does not parse: %s" % (f, e))
    by_kind = {}
    for f, doc in docs:
        for k in ("apiVersion", "kind", "metadata"):
            if k not in doc and not (k == "metadata" and doc.get("kind") == "Kustomization"):
                fail("%s: a document lacks %s" % (f, k))
        by_kind.setdefault(doc.get("kind"), []).append((f, doc))

    # every IW_ variable is a real setting (NAME_FILE: the secret form of NAME)
    def check_var(where, name):
        base = name[:-5] if name.endswith("_FILE") else name
        if name.startswith("IW_") and base not in settings:
            fail("%s: %s is not a setting of integration-worker --help" % (where, name))

    cm = {}
    for f, doc in by_kind.get("ConfigMap", []):
        for k, v in (doc.get("data") or {}).items():
            check_var(f, k)
            cm[k] = v
    ns = cm.get("IW_NAMESPACE", "ext-api")
    grace = duration_s(cm.get("IW_SHUTDOWN_GRACE", "30s"))
    http_port = int(cm.get("IW_HTTP_ADDR", "0.0.0.0:9400").rsplit(":", 1)[1])

    def pod_specs():
        for kind in ("Deployment", "Job"):
            for f, doc in by_kind.get(kind, []):
                yield f, kind, doc, doc["spec"]["template"]["spec"]

    deployments = {}
    roles = {"submitter", "poller", "resolver", "all", "declare"}
    for f, kind, doc, spec in pod_specs():
        name = doc["metadata"]["name"]
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
            fail("%s %s: pod must run as a non-root user" % (kind, name))
        if kind == "Deployment":
            deployments[name] = doc
            tgp = spec.get("terminationGracePeriodSeconds", 30)
            if tgp < grace + 5:
                fail("%s: terminationGracePeriodSeconds %s is not above IW_SHUTDOWN_GRACE %ss "
                     "(+5 s for the last publishes)" % (name, tgp, grace))
        for c in spec["containers"]:
            where = "%s %s/%s" % (kind, name, c["name"])
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                fail(where + ": root filesystem must be read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(where + ": allowPrivilegeEscalation must be false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(where + ": must drop ALL capabilities")
            role = (c.get("args") or [None])[0]
            if role not in roles:
                fail("%s: args[0] %r is not a role" % (where, role))
            for e in c.get("env", []):
                check_var(where, e["name"])
            if kind == "Deployment":
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                if ports.get("http") != http_port:
                    fail("%s: port http must be IW_HTTP_ADDR's %d" % (where, http_port))
                if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                    fail(where + ": readinessProbe must GET /readyz")
                if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                    fail(where + ": livenessProbe must GET /healthz")
    if not any(c.get("args", [None])[0] == "declare"
               for _, _, _, s in pod_specs() for c in s["containers"]):
        fail("no Job runs `integration-worker declare`")

    # a PodDisruptionBudget selects each Deployment's pods
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        ok = False
        for _, pdb in by_kind.get("PodDisruptionBudget", []):
            sel = pdb["spec"]["selector"]["matchLabels"]
            if all(labels.get(k) == v for k, v in sel.items()):
                ok = True
        if not ok:
            fail("Deployment %s has no PodDisruptionBudget" % name)

    # KEDA: every Deployment scales; queue triggers name the role's queue
    queue_of = {"submitter": ns + ".submit", "poller": ns + ".status", "resolver": ns + ".resource"}
    scaled = set()
    keda_exprs = []
    for f, so in by_kind.get("ScaledObject", []):
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            fail("ScaledObject %s targets unknown Deployment %s" % (so["metadata"]["name"], target))
            continue
        scaled.add(target)
        role = deployments[target]["spec"]["template"]["spec"]["containers"][0]["args"][0]
        for t in so["spec"]["triggers"]:
            meta = t.get("metadata", {})
            if t["type"] == "rabbitmq":
                if meta.get("queueName") != queue_of.get(role):
                    fail("ScaledObject for %s watches queue %r, not %r"
                         % (target, meta.get("queueName"), queue_of.get(role)))
                ref = t.get("authenticationRef", {}).get("name")
                if ref not in {d["metadata"]["name"] for _, d in by_kind.get("TriggerAuthentication", [])}:
                    fail("ScaledObject for %s: TriggerAuthentication %r missing" % (target, ref))
            elif t["type"] == "prometheus":
                keda_exprs.append(("ScaledObject for " + target, meta["query"]))
                check_metric_names("ScaledObject for " + target, meta["query"],
                                   exported_metrics(args.source))
            else:
                fail("ScaledObject for %s: unexpected trigger %s" % (target, t["type"]))
        if so["spec"].get("minReplicaCount", 0) < 1:
            fail("ScaledObject for %s scales to zero: nothing would ack or answer RPCs" % target)
    for name in deployments:
        if name not in scaled:
            fail("Deployment %s has no ScaledObject" % name)
    if keda_exprs:
        promtool_check_exprs(keda_exprs, "KEDA")
        check_exprs_return_data(keda_exprs, args, "KEDA")

    # scraping: annotations on the Service, or a ServiceMonitor on its port
    for f, svc in by_kind.get("Service", []):
        ann = svc["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") != str(http_port):
            fail("Service %s: prometheus.io/port is not %d" % (svc["metadata"]["name"], http_port))
    for f, sm in by_kind.get("ServiceMonitor", []):
        eps = sm["spec"]["endpoints"]
        if not any(e.get("path") == "/metrics" for e in eps):
            fail("ServiceMonitor %s does not scrape /metrics" % sm["metadata"]["name"])

    # kustomize lists every manifest but the examples and the optional ServiceMonitor
    kust = load_yaml_all(os.path.join(d, "kustomization.yaml"))[0]
    listed = set(kust.get("resources", []))
    for f in sorted(os.listdir(d)):
        if f.endswith(".yaml") and f != "kustomization.yaml" and "example" not in f \
                and f != "servicemonitor.yaml" and f not in listed:
            fail("kustomization.yaml does not list %s" % f)
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", d], capture_output=True, text=True)
        if r.returncode != 0:
            fail("kubectl kustomize failed: " + r.stderr)
        else:
            print("kubectl kustomize rendered %d documents" % r.stdout.count("\nkind: "))
    else:
        print("kubectl not installed: kustomize rendering not checked")
    print("%d manifests checked against %d settings" % (len(docs), len(settings)))


# ---------------------------------------------------------------------------- rabbitmq

def check_rabbitmq(args):
    d = json.load(open(os.path.join(args.source, "deploy/rabbitmq/definitions.json")))
    users = {u["name"]: u for u in d["users"]}
    perms = {p["user"]: p for p in d["permissions"]}
    if "integration-worker" not in users or "integration-worker" not in perms:
        fail("definitions.json lacks user integration-worker and its permissions")
        return
    u, p = users["integration-worker"], perms["integration-worker"]
    if "administrator" in u["tags"]:
        fail("integration-worker must not be an administrator")
    if "management" not in u["tags"]:
        fail("integration-worker needs the management tag (dlq, the management UI)")
    names = [q["name"] for q in d["queues"]] + [e["name"] for e in d["exchanges"]]
    if len(names) < 27:
        fail("definitions.json has only %d queues and exchanges" % len(names))
    for kind in ("configure", "write", "read"):
        rx = re.compile(p[kind])
        for n in names:
            if not rx.search(n):
                fail("%s regex %r does not cover %s" % (kind, p[kind], n))
        for other in ("other.submit", "ext-apix.submit", "xext-api.submit", "amq.topic",
                      "ext-api", "t-1.submit"):
            if rx.search(other):
                fail("%s regex %r also covers %s" % (kind, p[kind], other))
    # RPC replies and delay-tier publishes go through the default exchange
    if not re.search(p["write"], "amq.default"):
        fail("write regex must cover amq.default (RPC replies)")
    if re.search(p["configure"], "amq.default") or re.search(p["read"], "amq.default"):
        fail("only write needs amq.default")
    if u.get("password_hash"):
        fail("definitions.json must not carry integration-worker's password")
    print("user integration-worker covers %d names of ext-api and nothing else" % len(names))


# ---------------------------------------------------------------------------- redis

def source_redis_commands(src):
    """Every Redis command the worker and its scripts send."""
    cmds = set()
    for sub in ("common", "worker"):
        for root, _, files in os.walk(os.path.join(src, sub)):
            for fn in files:
                if not fn.endswith((".c", ".h", ".lua")):
                    continue
                text = open(os.path.join(root, fn)).read()
                cmds.update(c.lower() for c in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", text))
                cmds.update(c.lower() for c in re.findall(r'redis\.p?call\(\s*"([A-Za-z]+)"', text))
                for fmt in re.findall(r'(?:redisCommand|redisAppendCommand|redis_link_append|'
                                      r'redis_link_command)\([^";{}]*"([A-Z]+(?: [A-Z]+)?)[ "]', text):
                    words = fmt.split()
                    cmds.add(words[0].lower() + ("|" + words[1].lower()
                                                 if len(words) > 1 and words[0] in ("SCRIPT", "CLIENT")
                                                 else ""))
                if re.search(r'"EVALSHA"', text):
                    cmds.add("evalsha")
    return cmds


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def check_redis(args):
    acl = os.path.join(args.source, "deploy/redis/users.acl")
    lines = [l.split() for l in open(acl) if l.strip()]
    worker = [l for l in lines if l[:2] == ["user", "integration-worker"]]
    if len(worker) != 1:
        fail("users.acl must have one line for user integration-worker")
        return
    rules = worker[0][2:]
    keys = [r for r in rules if r.startswith("~") or r.startswith("%")]
    if keys != ["~ext-api:*"]:
        fail("integration-worker's key patterns are %s, expected ~ext-api:*" % keys)
    if "allkeys" in rules or "+@all" in rules or "allcommands" in rules or "nopass" in rules:
        fail("integration-worker must not have allkeys/+@all/nopass")
    if "-@all" not in rules:
        fail("integration-worker must start from -@all")
    granted = {r[1:].lower() for r in rules if r.startswith("+")}
    used = source_redis_commands(args.source)
    # SENTINEL goes to the sentinels (IW_REDIS_SENTINELS), whose users live in sentinel.conf;
    # a data node does not even know the command, so users.acl cannot grant it.
    used.discard("sentinel")
    if len(used) < 10:
        fail("found only %d Redis commands in the source: the scan is broken" % len(used))
    for c in sorted(used - granted):
        fail("the worker uses %s but users.acl does not grant it" % c.upper())
    print("the worker uses %s" % " ".join(sorted(used)))

    # the file must load into a real server (private instance, own port and dir)
    server = need("redis-server")
    cli = need("redis-cli")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="iw-acl-")
    shutil.copy(acl, os.path.join(tmp, "users.acl"))
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp, "--aclfile",
                             os.path.join(tmp, "users.acl")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 10
        listed = None
        while time.time() < deadline and proc.poll() is None:
            # `default off`: an unauthenticated PING must be refused (NOAUTH); the worker's
            # rights are checked on a second server below, where we can still log in.
            r = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True)
            if "NOAUTH" in r.stdout + r.stderr or "PONG" in r.stdout or "WRONGPASS" in r.stdout:
                listed = r.stdout + r.stderr
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            fail("redis-server refused users.acl:\n" + proc.stdout.read())
        elif listed is None:
            fail("redis-server with users.acl did not answer")
        elif "PONG" in listed:
            fail("the default user can still run commands (expected `user default off`)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # the worker's line on a server whose default user is on: the rules are accepted
    # and give exactly the key pattern and commands written
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            r = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True)
            if "PONG" in r.stdout:
                break
            time.sleep(0.1)
        r = subprocess.run([cli, "-p", str(port), "ACL", "SETUSER", "integration-worker"]
                           + [x.replace("resetpass", ">pw") for x in rules],
                           capture_output=True, text=True)
        if r.stdout.strip() != "OK":
            fail("ACL SETUSER with users.acl's rules failed: " + r.stdout + r.stderr)

        def as_worker(*cmd):
            return subprocess.run([cli, "-p", str(port), "--user", "integration-worker",
                                   "--pass", "pw", "--no-auth-warning"] + list(cmd),
                                  capture_output=True, text=True).stdout.strip()

        if as_worker("SET", "ext-api:x", "1") != "OK":
            fail("integration-worker cannot SET ext-api:x")
        for cmd in (["SET", "other:x", "1"], ["FLUSHALL"], ["KEYS", "*"], ["CONFIG", "GET", "*"],
                    ["EVAL", "return 1", "0"], ["SUBSCRIBE", "x"]):
            out = as_worker(*cmd)
            if "NOPERM" not in out:
                fail("integration-worker may run %s (%s)" % (" ".join(cmd), out[:80]))
        sha = as_worker("SCRIPT", "LOAD", "return redis.call('TIME')")
        if len(sha) != 40:
            fail("integration-worker cannot SCRIPT LOAD: " + sha)
        elif "NOPERM" in as_worker("EVALSHA", sha, "0") or not as_worker("EVALSHA", sha, "0"):
            fail("integration-worker cannot run a script calling TIME")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    print("users.acl loads; integration-worker limited to ext-api:* and %d commands" % len(granted))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["rules", "dashboard", "k8s", "rabbitmq", "redis"])
    ap.add_argument("--source", required=True)
    ap.add_argument("--worker", help="path of integration-worker (k8s)")
    ap.add_argument("--sample", help="path of metrics_sample (rules, dashboard, k8s)")
    args = ap.parse_args()
    {"rules": check_rules, "dashboard": check_dashboard, "k8s": check_k8s,
     "rabbitmq": check_rabbitmq, "redis": check_redis}[args.check](args)
    if failures:
        print("%d failure(s)" % len(failures), file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
