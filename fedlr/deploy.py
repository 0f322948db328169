"""Deployment on real Flower processes: SuperLink, SuperNodes and SuperExecs.

One plan of services (:func:`plan`) is the single source of truth for both

* ``fedlr deploy local``: every service as a process on this machine, the
  experiment submitted with ``flwr run``, outputs identical to ``fedlr run``;
* ``fedlr deploy compose``: the same services as a docker-compose file (the
  repository's ``docker-compose.yml`` is this output for 2 SuperNodes, and a
  test checks that they agree).

Roles (Flower 1.41, ``--isolation process``, see ``shared/specs/flower-notes.md``):

========================  =========================================================
``superlink``             Fleet, Control and Runtime APIs on one port (8000)
``serverapp``             ``flower-superexec`` that launches the ServerApp
``supernode-<i>``         one per client partition, ``--node-config partition-id=i``
``clientapp-<i>``         ``flower-superexec`` next to its SuperNode, runs ClientApps
========================  =========================================================
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlr.config import Config

SUPERLINK_PORT = 8000  # Flower 1.41: one HTTP server for Fleet, Control and Runtime APIs
SUPERNODE_PORT = 9094  # a SuperNode's own Runtime API, used by its SuperExec
FLWR_VERSION = "1.41.0"
CERTS = "/app/certs"  # where certificates are mounted in the containers
KEYS = "/app/keys"
# Run outputs (ServerApp) and per-client state (ClientApps) outlive the containers.
RESULTS_VOLUME = "./results:/app/results"


@dataclass(frozen=True)
class Service:
    """One Flower process: its role, command line and what it needs."""

    name: str
    executable: str
    args: tuple[str, ...]
    image: str
    depends_on: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # published to other machines
    gpu: bool = False
    volumes: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        return [self.executable, *self.args]


@dataclass(frozen=True)
class Topology:
    """Where each service listens: loopback ports locally, service names in compose."""

    superlink_host: str
    superlink_port: int
    bind: str
    supernode_hosts: tuple[str, ...]
    supernode_ports: tuple[int, ...]

    @classmethod
    def compose(cls, nodes: int) -> Topology:
        return cls("superlink", SUPERLINK_PORT, "0.0.0.0",
                   tuple(f"supernode-{i}" for i in range(nodes)), (SUPERNODE_PORT,) * nodes)

    @classmethod
    def local(cls, nodes: int, ports: list[int]) -> Topology:
        return cls("127.0.0.1", ports[0], "127.0.0.1", ("127.0.0.1",) * nodes, tuple(ports[1 : nodes + 1]))


def plan(nodes: int, topo: Topology, *, tls: bool = False, auth: bool = False, gpus: bool = False,
         certs: str = CERTS, keys: str = KEYS) -> list[Service]:
    """The services of a deployment with ``nodes`` SuperNodes.

    ``tls`` serves the SuperLink over TLS (certificates from
    ``deploy/gen-certs.sh``); ``auth`` makes the SuperLink accept only registered
    SuperNodes (keys from the same script; register them with
    ``flwr supernode register``); ``gpus`` reserves one GPU per ClientApp.
    """
    link = f"{topo.superlink_host}:{topo.superlink_port}"
    security = (
        ("--ssl-ca-certfile", f"{certs}/ca.crt", "--ssl-certfile", f"{certs}/server.pem",
         "--ssl-keyfile", f"{certs}/server.key") if tls else ("--insecure",)
    )
    client_security = ("--root-certificates", f"{certs}/ca.crt") if tls else ("--insecure",)
    cert_volume = ("./deploy/certs:/app/certs:ro",) if tls else ()
    services = [
        Service(
            "superlink", "flower-superlink",
            (*security, "--isolation", "process", "--host", topo.bind, "--port", str(topo.superlink_port),
             "--disable-runtime-dependency-installation", *(("--enable-supernode-auth",) if auth else ())),
            image=f"flwr/superlink:{FLWR_VERSION}", ports=(topo.superlink_port,), volumes=cert_volume,
        ),
        Service(
            "serverapp", "flower-superexec",
            (*client_security, "--runtime-api-address", link, "--executor", "subprocess"),
            image="fedlr:latest", depends_on=("superlink",), volumes=cert_volume + (RESULTS_VOLUME,),
        ),
    ]
    for i in range(nodes):
        node, node_host, node_port = f"supernode-{i}", topo.supernode_hosts[i], topo.supernode_ports[i]
        auth_args = (
            ("--auth-supernode-private-key", f"{keys}/{node}", "--auth-supernode-public-key", f"{keys}/{node}.pub")
            if auth else ()
        )
        services += [
            Service(
                node, "flower-supernode",
                (*client_security, "--superlink", link, "--isolation", "process", "--host", topo.bind,
                 "--port", str(node_port), "--node-config", f"partition-id={i} num-partitions={nodes}", *auth_args),
                image=f"flwr/supernode:{FLWR_VERSION}", depends_on=("superlink",),
                volumes=cert_volume + (("./deploy/keys:/app/keys:ro",) if auth else ()),
            ),
            Service(
                f"clientapp-{i}", "flower-superexec",
                ("--insecure", "--runtime-api-address", f"{node_host}:{node_port}", "--executor", "subprocess"),
                image="fedlr:latest", depends_on=(node,), gpu=gpus, volumes=(RESULTS_VOLUME,),
            ),
        ]
    return services


def compose_yaml(nodes: int, *, tls: bool = False, auth: bool = False, gpus: bool = False) -> str:
    """docker-compose text for :func:`plan` (the ``fedlr deploy compose`` output)."""
    services: dict[str, Any] = {}
    for svc in plan(nodes, Topology.compose(nodes), tls=tls, auth=auth, gpus=gpus):
        spec: dict[str, Any] = {"image": svc.image}
        if svc.image == "fedlr:latest":
            spec["build"] = {"context": ".", "dockerfile": "Dockerfile"}
        spec["entrypoint"] = [svc.executable]
        spec["command"] = list(svc.args)
        if svc.ports:
            spec["ports"] = [f"{p}:{p}" for p in svc.ports]
        if svc.depends_on:
            spec["depends_on"] = list(svc.depends_on)
        if svc.volumes:
            spec["volumes"] = list(svc.volumes)
        if svc.gpu:
            # Fractional sharing is a simulation concept; a deployed ClientApp gets a
            # device. Shared memory for PyTorch data loading in containers.
            spec["shm_size"] = "2gb"
            spec["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
        services[svc.name] = spec
    header = (
        f"# Generated by `fedlr deploy compose --nodes {nodes}"
        + (" --tls" if tls else "") + (" --auth" if auth else "") + (" --gpus" if gpus else "")
        + "`; do not edit by hand.\n"
        "# The same service commands run as local processes in `fedlr deploy local` (fedlr/deploy.py).\n"
    )
    return header + yaml.safe_dump({"services": services}, sort_keys=False, width=120)


# ------------------------------------------------------------------ local run
class DeployFailed(RuntimeError):
    """The deployed run failed, or a service died; the message says which."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployFailed(f"{name} exited with code {proc.returncode} at start-up; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployFailed(f"{name} did not listen on port {port} within {timeout:.0f} s; see {log}")


def project_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise DeployFailed(f"fedlr deploy local needs the project source with pyproject.toml (looked in {root})")
    return root


class LocalDeployment:
    """Runs :func:`plan` as processes on this machine and stops them all on exit."""

    def __init__(self, nodes: int, out: Path) -> None:
        self.nodes = nodes
        self.out = out
        self.logs = out / "deploy"
        self.home = out / "deploy" / "flwr-home"
        ports = _free_ports(nodes + 1)
        self.topo = Topology.local(nodes, ports)
        self.services = plan(nodes, self.topo)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def __enter__(self) -> LocalDeployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "fedlr-local"\n\n[superlink.fedlr-local]\n'
            f'address = "127.0.0.1:{self.topo.superlink_port}"\ninsecure = true\n'
        )
        (self.logs / "services.txt").write_text("".join(shlex.join(s.argv()) + "\n" for s in self.services))
        try:
            for svc in self.services:
                self._start(svc)
                if svc.name == "superlink":
                    _wait_port(self.topo.superlink_port, 60, self.procs[svc.name], svc.name, self._log(svc.name))
        except BaseException:
            self.stop()
            raise
        (self.logs / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs.items()}, indent=2) + "\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _start(self, svc: Service) -> None:
        exe = Path(sys.executable).with_name(svc.executable)
        with self._log(svc.name).open("wb") as log:
            # A session of its own: stop() signals the process group, which takes
            # the ServerApp/ClientApp processes a SuperExec spawned with it.
            self.procs[svc.name] = subprocess.Popen(
                [str(exe), *svc.args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.out, start_new_session=True,
            )

    def dead_service(self) -> str | None:
        """A one-line description of the first service that exited, if any."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode} during the run; see {self._log(name)}"
        return None

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).with_name("flwr")
        return subprocess.run([str(exe), *args], env=self.env, cwd=self.out, capture_output=True, text=True,
                              timeout=timeout)


def run_local(cfg: Config, cfg_path: Path, out: Path, *, nodes: int, quiet: bool = False,
              poll_s: float = 1.0) -> dict[str, Any]:
    """Run ``cfg`` on real local Flower processes and return ``summary.json``.

    The run is submitted with ``flwr run`` and followed through the files the
    ServerApp writes (``metrics.jsonl``, ``status.json``) and ``flwr list``;
    ``flwr run`` itself exits 0 even when a run fails, so its exit code is not
    trusted. A service that dies fails the run at once instead of leaving the
    ServerApp waiting for a round that cannot finish.
    """
    from fedlr.results import progress_line, read_metrics

    with LocalDeployment(nodes, out) as dep:
        submit = dep.flwr("run", str(project_root()), "fedlr-local", "--format", "json",
                          "-c", f"config='{cfg_path.resolve()}' out='{out.resolve()}'")
        try:
            run_id = int(json.loads(submit.stdout)["run-id"])
        except (ValueError, KeyError):
            raise DeployFailed(f"flwr run did not start the run: {(submit.stdout + submit.stderr).strip()[-2000:]}") from None
        shown = 0
        for tick in range(sys.maxsize):
            time.sleep(poll_s)
            rows = read_metrics(out)
            for row in rows[shown:]:
                if not quiet:
                    print(progress_line(row, cfg["rounds"]), file=sys.stderr, flush=True)
            shown = len(rows)
            status = _read_status(out)
            if status.get("status") == "completed":
                return json.loads((out / "summary.json").read_text())
            if status.get("status") == "failed":
                raise DeployFailed(status.get("error", "the ServerApp failed"))
            dead = dep.dead_service()
            if dead:
                raise DeployFailed(dead)
            # `flwr list` starts a Python process: ask Flower only now and then.
            flower_status = _flower_status(dep, run_id) if tick % 10 == 9 else ""
            if flower_status.startswith("finished"):
                # Finished without our status file: the ServerApp never got going.
                time.sleep(poll_s)
                if _read_status(out).get("status") == "completed":
                    continue
                raise DeployFailed(f"Flower reports run {run_id} {flower_status}; see {dep.logs}/serverapp.log")
    raise AssertionError("unreachable")


def _read_status(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _flower_status(dep: LocalDeployment, run_id: int) -> str:
    listing = dep.flwr("list", "fedlr-local", "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(listing.stdout).get("runs", [])
        return str(runs[0]["status"]) if runs else ""
    except (ValueError, KeyError, IndexError):
        return ""
