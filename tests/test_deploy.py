"""Deployment: the compose file and the local processes come from one plan, and a
real local deployment (SuperLink, SuperNodes, SuperExecs) runs the experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedlr.deploy import SUPERLINK_PORT, SUPERNODE_PORT, Topology, compose_yaml, plan
from tests.conftest import TINY, read_jsonl, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_compose_file_is_the_generated_one() -> None:
    assert (ROOT / "docker-compose.yml").read_text() == compose_yaml(2)


@pytest.mark.parametrize("flags", [{}, {"tls": True}, {"tls": True, "auth": True, "gpus": True}])
def test_compose_services_are_consistent(flags: dict) -> None:
    nodes = 3
    services = yaml.safe_load(compose_yaml(nodes, **flags))["services"]
    assert set(services) == {"superlink", "serverapp"} | {f"{r}-{i}" for r in ("supernode", "clientapp") for i in range(nodes)}
    listens = {"superlink": SUPERLINK_PORT, **{f"supernode-{i}": SUPERNODE_PORT for i in range(nodes)}}
    for name, spec in services.items():
        cmd = spec["command"]
        assert all(dep in services for dep in spec.get("depends_on", []))
        if "--runtime-api-address" in cmd:  # every SuperExec points at a service that listens there
            host, port = cmd[cmd.index("--runtime-api-address") + 1].split(":")
            assert listens[host] == int(port) and host in spec["depends_on"]
        if "--superlink" in cmd:
            assert cmd[cmd.index("--superlink") + 1] == f"superlink:{SUPERLINK_PORT}"
        if name.startswith("supernode-"):
            i = int(name.split("-")[1])
            assert cmd[cmd.index("--node-config") + 1] == f"partition-id={i} num-partitions={nodes}"
            assert cmd[cmd.index("--port") + 1] == str(SUPERNODE_PORT)
        if name.startswith("clientapp-") or name == "serverapp":
            assert spec["build"] == {"context": ".", "dockerfile": "Dockerfile"}
            assert "./results:/app/results" in spec["volumes"]
        over_tls = name in ("superlink", "serverapp") or name.startswith("supernode-")  # SuperLink connections
        assert ("--insecure" in cmd) == (not (flags.get("tls", False) and over_tls))
    assert services["superlink"]["ports"] == [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]  # the one port to open
    assert ("--enable-supernode-auth" in services["superlink"]["command"]) == flags.get("auth", False)
    gpu = services["clientapp-0"].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert bool(gpu) == flags.get("gpus", False)
    assert ("shm_size" in services["clientapp-0"]) == flags.get("gpus", False)


def test_local_processes_run_the_compose_commands() -> None:
    """One source of truth: local argv equals the compose command once service
    names and ports are mapped to loopback addresses."""
    nodes = 2
    ports = [41000, 41001, 41002]
    local = {s.name: s for s in plan(nodes, Topology.local(nodes, ports))}
    compose = {s.name: s for s in plan(nodes, Topology.compose(nodes))}
    mapping = {f"superlink:{SUPERLINK_PORT}": f"127.0.0.1:{ports[0]}", "0.0.0.0": "127.0.0.1",
               str(SUPERLINK_PORT): str(ports[0])}
    for i in range(nodes):
        mapping[f"supernode-{i}:{SUPERNODE_PORT}"] = f"127.0.0.1:{ports[1 + i]}"
    for name, svc in compose.items():
        translated = [mapping.get(a, a) for a in svc.args]
        if name.startswith("supernode-"):
            translated[translated.index("--port") + 1] = str(ports[1 + int(name.split("-")[1])])
        assert list(local[name].args) == translated, name
        assert local[name].executable == svc.executable


def test_gen_certs_script_makes_a_ca_signed_server_cert(tmp_path: Path) -> None:
    script = tmp_path / "deploy" / "gen-certs.sh"
    script.parent.mkdir()
    script.write_text((ROOT / "deploy" / "gen-certs.sh").read_text())
    script.chmod(0o755)
    subprocess.run([str(script), "1"], check=True, capture_output=True)
    certs = tmp_path / "deploy" / "certs"
    verify = subprocess.run(["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.pem"],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout
    text = subprocess.run(["openssl", "x509", "-in", certs / "server.pem", "-noout", "-text"],
                          capture_output=True, text=True).stdout
    assert "DNS:superlink" in text and "IP Address:127.0.0.1" in text
    assert (tmp_path / "deploy" / "keys" / "supernode-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


DEPLOY_TINY = TINY.replace("num_clients = 4", "num_clients = 2")


@pytest.mark.ray
def test_deploy_local_matches_the_simulation(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEPLOY_TINY)
    sim = run_cli("run", str(cfg), "--out", str(tmp_path / "sim"), "--quiet")
    assert sim.returncode == 0, sim.stderr
    dep = run_cli("deploy", "local", str(cfg), "--nodes", "2", "--out", str(tmp_path / "dep"), timeout=600)
    assert dep.returncode == 0, dep.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(read_jsonl(tmp_path / "dep" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "sim" / "metrics.jsonl"))
    assert json.loads((tmp_path / "dep" / "summary.json").read_text())["rounds"] == 2
    pids = json.loads((tmp_path / "dep" / "deploy" / "pids.json").read_text())
    for pid in pids.values():  # everything it started is stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.ray
def test_killed_supernode_fails_the_deployment_loudly(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEPLOY_TINY.replace("rounds = 2", "rounds = 50"))
    out = tmp_path / "dep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlr.cli", "deploy", "local", str(cfg), "--nodes", "2", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and read_jsonl(out / "metrics.jsonl")):
            assert time.monotonic() < deadline and proc.poll() is None, "the deployment never reached round 0"
            time.sleep(0.5)
        pids = json.loads((out / "deploy" / "pids.json").read_text())
        os.killpg(pids["supernode-1"], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert stderr.startswith("fedlr: run failed: supernode-1 exited with code -9 during the run; see ")
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
