"""The operations kit in deploy/: Prometheus rules checked and unit-tested by promtool, the
KEDA and KServe objects checked against their CRDs' schemas, and (end to end) a real Prometheus
scraping a real `llmwarm serve`, where every query of the Grafana dashboard, every rule and
the autoscaler's query is evaluated and must return data."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from benchmarks.launch import ROOT, free_port
from tests.served import AUTH, Served

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "llmwarm-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "llmwarm-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "llmwarm-dashboard.json"
SCALED_OBJECT = DEPLOY / "keda" / "scaledobject.yaml"
SERVING_RUNTIME = DEPLOY / "kserve" / "servingruntime.yaml"


SCHEMAS = ROOT / "tests" / "schemas"
KEDA = ("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "IScaledObject", "ScaledObject")
GRAFANA = ("@grafana/schema", "Dashboard")
KSERVE_VENV = ROOT / os.environ.get("LLMWARM_KSERVE_VENV", ".cache/kserve-venv")


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"no {name}: scripts/setup installs it"
    return found


def against_schema(data: Any, *model: str) -> str:
    """What KEDA's CRD or Grafana's dashboard schema finds wrong with `data` ("" if nothing):
    tests/schemas/validate.mjs, with the packages `scripts/setup` installs there."""
    assert (SCHEMAS / "node_modules").is_dir(), "scripts/setup runs npm ci in tests/schemas"
    done = subprocess.run(
        [tool("node"), str(SCHEMAS / "validate.mjs"), *model],
        input=json.dumps(data), capture_output=True, text=True,
    )  # fmt: skip
    return "" if done.returncode == 0 else done.stderr + done.stdout


def against_kserve(path: Path) -> str:
    """What KServe's API types find wrong with the objects in `path` ("" if nothing)."""
    python = KSERVE_VENV / "bin" / "python"
    assert python.exists(), "scripts/setup installs KServe's SDK in .cache/kserve-venv"
    done = subprocess.run(
        [str(python), str(SCHEMAS / "kserve_check.py"), str(path)], capture_output=True, text=True
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout, done.stdout


def test_promtool_unit_tests_every_alert() -> None:
    done = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TEST.name],
        capture_output=True, text=True, cwd=RULES_TEST.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for c in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in c.get("alert_rule_test", [])}  # fmt: skip
    assert tested == alerts  # each fires in a test, and is seen quiet before it


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    # the check is real: a misspelt function is caught
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.read_text().replace("max_over_time(", "max_overtime(", 1))
    done = subprocess.run([tool("promtool"), "check", "rules", str(bad)], capture_output=True)
    assert done.returncode != 0


# --- KEDA, KServe and Grafana against their schemas -------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_the_scaled_object_matches_kedas_crd() -> None:
    assert against_schema(_yaml(SCALED_OBJECT), *KEDA) == ""


def _misspelt(data: Any) -> Any:
    bad = copy.deepcopy(data)
    bad["spec"]["minReplicaCont"] = bad["spec"].pop("minReplicaCount")
    return bad


def _mistyped(data: Any) -> Any:
    bad = copy.deepcopy(data)
    bad["spec"]["pollingInterval"] = "15s"
    return bad


def _panel_misspelt(data: Any) -> Any:
    bad = copy.deepcopy(data)
    bad["panels"][0]["gridPoss"] = bad["panels"][0].pop("gridPos")
    return bad


@pytest.mark.parametrize(
    ("path", "model", "spoil", "said"),
    [
        (SCALED_OBJECT, KEDA, _misspelt, "minReplicaCont"),
        (SCALED_OBJECT, KEDA, _mistyped, "pollingInterval must be integer"),
        (DASHBOARD, GRAFANA, _panel_misspelt, "gridPoss"),
    ],
    ids=["keda-misspelt-field", "keda-wrong-type", "grafana-misspelt-field"],
)
def test_the_schema_checks_are_real(
    path: Path, model: tuple[str, ...], spoil: Any, said: str
) -> None:
    data = json.loads(path.read_text()) if path.suffix == ".json" else _yaml(path)
    assert said in against_schema(spoil(data), *model)


def test_the_scaled_object_scales_the_deployment_on_vllms_queue() -> None:
    scaled = _yaml(SCALED_OBJECT)
    deployment = next(
        d for d in yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )  # fmt: skip
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    queue, hold = scaled["spec"]["triggers"]
    for trigger in (queue, hold):
        # what KEDA's prometheus scaler requires (its metadata is a free map in the CRD)
        assert trigger["type"] == "prometheus"
        assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    assert "vllm:num_requests_waiting" in selectors(queue["metadata"]["query"])[0]
    assert any("llmwarm_expected_ready_in_seconds" in s for s in selectors(HOLD))


HOLD = _yaml(SCALED_OBJECT)["spec"]["triggers"][1]["metadata"]["query"]


def _series(replica: str, phase: str, expected: str | None) -> list[dict[str, str]]:
    """A replica's phase (StateSet) and predicted time to ready, for promtool."""
    out = [
        {"series": f'llmwarm_phase{{job="llmwarm", instance="{replica}", llmwarm_phase="{p}"}}',
         "values": "1x3" if p == phase else "0x3"}
        for p in ("loading", "warming", "ready", "stopping")
    ]  # fmt: skip
    if expected is not None:
        labels = f'job="llmwarm", instance="{replica}"'
        out.append({"series": f"llmwarm_expected_ready_in_seconds{{{labels}}}", "values": expected})
    return out


@pytest.mark.parametrize(
    ("replicas", "held"),
    [
        ([("a", "ready", "0x3"), ("b", "ready", "0x3")], 0),  # nothing on its way: no hold
        ([("a", "ready", "0x3"), ("b", "warming", "40x3")], 2),  # b arrives: keep both
        ([("a", "ready", "0x3"), ("b", "loading", None)], 0),  # a first start: no prediction
        ([("a", "ready", "0x3"), ("b", "loading", "3600x3")], 0),  # stuck for an hour: not held
        ([("a", "stopping", "0x3"), ("b", "loading", "90x3"), ("c", "ready", "0x3")], 2),
    ],
    ids=["all-ready", "one-arriving", "no-prediction", "stuck", "one-stopping"],
)
def test_the_scale_in_guard_holds_the_fleet_while_a_replica_arrives(
    tmp_path: Path, replicas: list[tuple[str, str, str | None]], held: int
) -> None:
    # KEDA's second trigger, evaluated by promtool on a fleet's series
    series = [s for r in replicas for s in _series(*r)]
    test = {
        "tests": [{
            "interval": "1m", "input_series": series,
            "promql_expr_test": [{"expr": HOLD, "eval_time": "1m",
                                  "exp_samples": [{"labels": "{}", "value": held}]}],
        }]
    }  # fmt: skip
    (tmp_path / "hold.test.yaml").write_text(yaml.safe_dump(test))
    done = subprocess.run(
        [tool("promtool"), "test", "rules", "hold.test.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_serving_runtime_matches_kserves_api_types(tmp_path: Path) -> None:
    assert against_kserve(SERVING_RUNTIME) == ""
    runtime = _yaml(SERVING_RUNTIME)
    bad = copy.deepcopy(runtime)
    probe = bad["spec"]["containers"][0]["readinessProbe"]
    probe["failureTreshold"] = probe.pop("failureThreshold")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert "failureTreshold: not a field of V1Probe" in against_kserve(tmp_path / "bad.yaml")


def test_the_serving_runtime_routes_only_to_a_warm_engine() -> None:
    (container,) = _yaml(SERVING_RUNTIME)["spec"]["containers"]
    port = next(p["containerPort"] for p in container["ports"])
    assert f"--port={port}" in container["args"]
    for probe, path in [("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/live")]:  # fmt: skip
        assert container[probe]["httpGet"] == {"path": path, "port": port}, probe


def test_the_dashboard_matches_grafanas_schema() -> None:
    assert against_schema(json.loads(DASHBOARD.read_text()), *GRAFANA) == ""


def test_the_dashboard_shows_what_an_operator_asks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]  # fmt: skip
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    text = DASHBOARD.read_text()
    used = {m for m in ("$datasource", "${datasource}", "$job") if m in text}
    assert {u.strip("${}") for u in used} <= variables
    named = " ".join(s for where, expr in queries().items() if where.startswith("dashboard")
                     for s in selectors(expr))  # fmt: skip
    # the list: phase per replica, time to ready split, per-bucket warm latency,
    # covered share and cold misses, JIT events, beside vLLM's own series
    for metric in ["llmwarm_phase", "llmwarm_engine_start_seconds", "llmwarm_warmup_seconds",
                   "llmwarm_bucket_warm_ttft_seconds", "llmwarm_bucket_warm_tpot_seconds",
                   "llmwarm_requests_total", "llmwarm_cold_miss_ratio",
                   "llmwarm_jit_events_total", "vllm:num_requests_waiting",
                   "llmwarm_expected_ready_in_seconds", "llmwarm_startup_seconds",
                   "llmwarm_warmup_done_ratio",
                   "vllm:time_to_first_token_seconds_bucket"]:  # fmt: skip
        assert metric in named, metric


# --- every query, against a real Prometheus ---------------------------------------------------


def _rules() -> dict[str, Any]:
    return dict(yaml.safe_load(RULES.read_text()))


def queries() -> dict[str, str]:
    """Every PromQL expression an operator deploys with: the dashboard's (its variables as
    Grafana fills them), the rules', the autoscaler's."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", "llmwarm").replace("$__rate_interval", "1m")
            found[f"dashboard: {panel['title']} ({target['refId']})"] = expr
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            what = "alert" if "alert" in rule else "record"
            found[f"{what} {rule[what]}"] = rule["expr"]
    keda = yaml.safe_load(SCALED_OBJECT.read_text())
    for i, trigger in enumerate(keda["spec"]["triggers"]):
        found[f"KEDA trigger {trigger.get('name', i)}"] = trigger["metadata"]["query"]
    return found


def selectors(expr: str) -> list[str]:
    """The series selectors of an expression, as Prometheus's grammar parses it."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            out.append(str(node))
            return
        for name in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, name, None)
            if child is not None and not isinstance(child, str | int | float):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return out


def test_every_query_names_its_series() -> None:
    found = queries()
    assert len(found) >= 25
    for where, expr in found.items():
        assert selectors(expr), where


PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{rules}]
scrape_configs:
  - job_name: llmwarm
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int) -> Iterator[httpx.Client]:
    """A real Prometheus scraping `target_port` every second, the rules loaded: a client of
    its HTTP API."""
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(rules=RULES, port=target_port))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/-/ready").status_code == 200:
                        break
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            yield client
    finally:
        proc.terminate()
        proc.wait(30)


def query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    answer = client.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def until(what: str, check: Any, timeout: float = 300, seen: Any = None) -> None:
    """Until `check()`: Prometheus scrapes and evaluates every second; `timeout` is a hang
    guard (a scrape that never comes), not a bound on how fast."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}; {seen and seen()}"
        time.sleep(0.5)


# the uncovered requests counted, and a recording rule evaluated since
UNCOVERED = 'llmwarm_requests_total{covered="false"}'
UNCOVERED_RECORDED = "job:llmwarm_requests_uncovered:ratio_rate15m > 0"


def _value(client: httpx.Client, expr: str) -> float:
    return sum(float(r["value"][1]) for r in query(client, expr))


@pytest.mark.e2e
def test_every_query_returns_data_from_a_real_prometheus(served: Served, tmp_path: Path) -> None:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as client:
        with prometheus(tmp_path, client.base_url.port or 80) as prom:
            # scraped before the traffic, so that a rate has a sample from before it (the shared
            # server has served other tests: counts are read from here on)
            until("a first scrape", lambda: query(prom, "llmwarm_requests_total"))
            before = _value(prom, UNCOVERED)
            # live traffic: a kind the minimal profile warms, and one it does not (n > 1),
            # several times, so its cold miss has later requests to be measured against
            body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4}
            for _ in range(3):
                assert client.post("/v1/completions", json=body).status_code == 200
                assert client.post("/v1/completions", json=body | {"n": 2}).status_code == 200
            until(
                "the traffic scraped and the rules evaluated",
                lambda: (
                    _value(prom, UNCOVERED) >= before + 3 and bool(query(prom, UNCOVERED_RECORDED))
                ),
                seen=lambda: (
                    query(prom, "llmwarm_requests_total"),
                    [
                        line
                        for line in client.get("/metrics").text.splitlines()
                        if line.startswith("llmwarm_requests_total")
                    ],
                ),  # fmt: skip
            )
            empty = []
            for where, expr in queries().items():
                for selector in selectors(expr):
                    if not query(prom, selector):
                        empty.append(f"{where}: {selector}")
                # an alert's expression is empty until it fires; a recording rule's or a
                # panel's is not
                if not where.startswith("alert") and not query(prom, expr):
                    empty.append(f"{where}: {expr}")
            assert not empty, "\n".join(empty)
