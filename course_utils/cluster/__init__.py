"""A cluster on one machine (lesson 14, ``scripts/cluster``): "nodes" that are Linux network
namespaces, joined by a slow link, for torchrun and SLURM to run across for real.

Each node is a network namespace with its own loopback, its own address on its link ``eth0``, and
(for every command started in it by :func:`spawn`) its own host name, ``node0``, ``node1``... in a
UTS namespace. The nodes' links are veth pairs whose other ends hang on a bridge, and the bridge
lives in a namespace of its own, the *switch*: nothing is added to the host's own network, no
address and no interface, so nothing the cluster runs can listen there. Inside a node, workers
reach each other over the node's loopback (the kernel routes a node's own address there); between
nodes every byte crosses two veths and the bridge.

**A slow link.** Each veth's sending side gets a token bucket (``tc qdisc ... tbf``), on the node's
end and on the switch's, so each node sends and receives at most ``rate`` (for example ``1gbit``),
against the many GB/s of loopback: the network of a real cluster is slower than its nodes. The
bucket lets a burst through at full speed first (:func:`burst_bytes`: 2 ms at the rate, at least
256 KiB), saved up while the link is idle: a wire can't do that, and lesson 14 measures what it
lends a small model's all-reduce (most of the CNN's 334 KB of gradients leave at once). A smaller
bucket is more like a wire on slow links (``tbf`` splits the veth's 64 KiB segments to fit).

**Nothing left behind.** Everything is named after the cluster (``course-node0``,
``course-switch``); :func:`down` kills every process in its namespaces and deletes them (their
veths and queues go with them), the host-name files ``ip netns exec`` reads
(``/etc/netns/<namespace>/hosts``) and the cluster's record (``/run/course-cluster/<name>.json``). A failed :func:`up` calls it before it raises.

It needs root: ``ip netns`` mounts and writes ``/run/netns``. :func:`unavailable` says so in one
line where the cluster can't be made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NAME = "course"  # the default cluster's name: namespaces course-node0, course-switch, ...
SUBNET = "10.99.0"  # node i is 10.99.0.(i+1)/24, on its link; only inside the namespaces
LINK = "eth0"  # each node's link to the switch (GLOO_SOCKET_IFNAME for cross-node traffic)
BRIDGE = "br0"
ETC = Path("/etc/netns")  # ip netns exec bind-mounts /etc/netns/<ns>/hosts over /etc/hosts
STATE = Path("/run/course-cluster")  # <name>.json: the running cluster's nodes and rate
MIN_BURST = 256 * 1024  # bytes: the bucket's least burst (what a cloud's rate limit lends)
MAX_NODES = 16


class ClusterError(RuntimeError):
    """A command that made or changed the cluster failed: names the command and its message."""


@dataclass(frozen=True)
class Cluster:
    """A running (or about to run) cluster: its name, number of nodes and link rate."""

    name: str = NAME
    nodes: int = 2
    rate: str | None = "1gbit"  # tc's units (1gbit, 100mbit, 500kbit); None: no limit

    def namespace(self, node: int) -> str:
        return f"{self.name}-node{node}"

    @property
    def switch(self) -> str:
        return f"{self.name}-switch"

    def namespaces(self) -> list[str]:
        return [self.namespace(i) for i in range(self.nodes)] + [self.switch]

    @staticmethod
    def hostname(node: int) -> str:
        return f"node{node}"

    @staticmethod
    def address(node: int) -> str:
        return f"{SUBNET}.{node + 1}"


def unavailable() -> str | None:
    """None where a cluster can be made here; else why not, in one line."""
    if not sys.platform.startswith("linux"):
        return "the cluster needs Linux network namespaces (this is " + sys.platform + ")"
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    if missing:
        return (
            f"the cluster needs {', '.join(missing)} (Debian: apt-get install iproute2 util-linux)"
        )
    if os.geteuid() != 0:
        return (
            "the cluster needs root (ip netns creates network namespaces): sudo scripts/cluster up"
        )
    return None


def _run(*argv: str, check: bool = True) -> str:
    """Run one command; on failure raise ClusterError naming it and what it printed."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def rate_bytes(rate: str) -> float:
    """tc's rate units in bytes per second: '1gbit' -> 1.25e8, '100mbit', '800kbit', '10mbps'."""
    text = rate.strip().lower()
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "bit": 1 / 8}
    units |= {"kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "bps": 1.0}
    for unit, scale in units.items():
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"link rate {rate!r}: give a number with tc's units, like 1gbit or 100mbit")


def burst_bytes(rate: str) -> int:
    """The token bucket's size on a link of ``rate``: 2 ms at the rate, at least MIN_BURST."""
    return max(MIN_BURST, int(rate_bytes(rate) * 0.002))


def _shape(namespace: str, device: str, rate: str | None) -> None:
    """Put (or replace) the token bucket on one veth's sending side; None removes it."""
    if rate is None:
        _run("tc", "-n", namespace, "qdisc", "del", "dev", device, "root", check=False)
        return
    burst = burst_bytes(rate)
    _run(
        "tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
        "rate", rate, "burst", str(burst), "latency", "200ms",
    )  # fmt: skip


def existing(name: str = NAME) -> list[str]:
    """The namespaces of cluster ``name`` that exist now."""
    listed = _run("ip", "netns", "list", check=False).split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    prefix = f"{name}-"
    return sorted(
        n for n in names if n.startswith(prefix) and n[len(prefix) :].startswith(("node", "switch"))
    )


def up(cluster: Cluster = Cluster()) -> Cluster:
    """Make the cluster: switch, nodes, links, addresses, host names, rate. Refuses when one of the
    same name exists; on any failure removes what it made, then raises."""
    problem = unavailable()
    if problem:
        raise ClusterError(problem)
    if not 1 <= cluster.nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, got {cluster.nodes}")
    if cluster.rate is not None:
        rate_bytes(cluster.rate)  # a bad rate is refused before anything is made
    if existing(cluster.name):
        raise ClusterError(f"cluster {cluster.name!r} is already up: scripts/cluster down first")
    try:
        _make(cluster)
    except BaseException:
        down(cluster.name)
        raise
    return cluster


def _make(cluster: Cluster) -> None:
    sw = cluster.switch
    _run("ip", "netns", "add", sw)
    _run("ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge")
    for dev in ("lo", BRIDGE):
        _run("ip", "-n", sw, "link", "set", dev, "up")
    # the nodes' names, also for IPv4-mapped IPv6 addresses (PyTorch's stores look their peers
    # up that way, and the nodes have no DNS to ask)
    hosts = ["127.0.0.1 localhost", "::1 localhost", "::ffff:127.0.0.1 localhost"] + [
        f"{prefix}{cluster.address(i)} {cluster.hostname(i)}"
        for i in range(cluster.nodes)
        for prefix in ("", "::ffff:")
    ]
    for i in range(cluster.nodes):
        ns, port = cluster.namespace(i), cluster.hostname(i)
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", LINK, "type", "veth", "peer", "name", port, "netns", sw)
        _run("ip", "-n", sw, "link", "set", port, "master", BRIDGE)
        _run("ip", "-n", sw, "link", "set", port, "up")
        _run("ip", "-n", ns, "addr", "add", f"{cluster.address(i)}/24", "dev", LINK)
        _run("ip", "-n", ns, "link", "set", LINK, "up")
        (ETC / ns).mkdir(parents=True, exist_ok=True)
        (ETC / ns / "hosts").write_text("\n".join(hosts) + "\n")
    set_rate(cluster, cluster.rate)


def set_rate(cluster: Cluster, rate: str | None) -> Cluster:
    """Change the link rate of a running cluster (both directions of every node's link)."""
    for i in range(cluster.nodes):
        _shape(cluster.namespace(i), LINK, rate)
        _shape(cluster.switch, cluster.hostname(i), rate)
    changed = Cluster(cluster.name, cluster.nodes, rate)
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / f"{cluster.name}.json").write_text(json.dumps(vars(changed)))
    return changed


def find(name: str = NAME) -> Cluster | None:
    """The running cluster called ``name`` (its nodes and rate), or None."""
    if not existing(name):
        return None
    path = STATE / f"{name}.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        nodes = sum(1 for ns in existing(name) if "-node" in ns)
        return Cluster(name, nodes, None)
    return Cluster(saved["name"], saved["nodes"], saved["rate"])


def pids(namespace: str) -> list[int]:
    """The processes in a node's (or the switch's) network namespace."""
    return [int(p) for p in _run("ip", "netns", "pids", namespace, check=False).split()]


def kill_node(
    cluster: Cluster, node: int, sig: int = signal.SIGKILL, silent: bool = False
) -> list[int]:
    """Kill every process on ``node``; returns their pids. The node's kernel lives on and answers
    its peers with resets, so their connections fail at once: a crashed program. ``silent``
    cuts its link first: a machine that loses power, which its peers learn of only by their own
    timeouts."""
    if silent:
        set_link(cluster, node, False)
    killed = pids(cluster.namespace(node))
    for pid in killed:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return killed


def set_link(cluster: Cluster, node: int, up_: bool) -> None:
    """Cut (``False``) or mend a node's link, as a pulled cable: ``ip link set eth0 down``."""
    _run("ip", "-n", cluster.namespace(node), "link", "set", LINK, "up" if up_ else "down")


def down(name: str = NAME, wait_s: float = 5.0) -> list[str]:
    """Remove cluster ``name``: kill its processes, delete its namespaces (their veths and queues
    go with them) and its /etc/netns files. Returns the namespaces removed. Safe to call twice."""
    spaces = existing(name)
    for ns in spaces:
        for pid in pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + wait_s
    while any(pids(ns) for ns in spaces) and time.monotonic() < deadline:
        time.sleep(0.05)
    for ns in spaces:
        _run("ip", "netns", "delete", ns, check=False)
    for folder in ETC.glob(f"{name}-*") if ETC.exists() else []:
        if folder.name[len(name) + 1 :].startswith(("node", "switch")):  # not course-x's
            shutil.rmtree(folder, ignore_errors=True)
    (STATE / f"{name}.json").unlink(missing_ok=True)
    left = existing(name)
    if left:
        raise ClusterError(f"could not remove {', '.join(left)}")
    return spaces


def command(cluster: Cluster, node: int, argv: list[str]) -> list[str]:
    """``argv`` as run on ``node``: in its network namespace (with its /etc/hosts), under its
    own host name in a UTS namespace of its own. ``ip netns exec``, ``unshare`` and ``sh`` each
    replace themselves, so the process started is ``argv`` itself (its pid is the Popen's)."""
    ns, host = cluster.namespace(node), cluster.hostname(node)
    shell = 'hostname "$0" && exec "$@"'
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "--", "sh", "-c", shell, host, *argv]


def spawn(cluster: Cluster, node: int, argv: list[str], **popen) -> subprocess.Popen:
    """Start ``argv`` on ``node`` (see :func:`command`); ``popen`` goes to ``subprocess.Popen``."""
    return subprocess.Popen(command(cluster, node, [str(a) for a in argv]), **popen)


def link_bytes(cluster: Cluster, node: int) -> dict[str, int]:
    """Bytes the node's link has sent and received since the cluster came up (its counters)."""
    out = _run("ip", "-j", "-s", "-n", cluster.namespace(node), "link", "show", "dev", LINK)
    stats = json.loads(out)[0]["stats64"]
    return {"sent": stats["tx"]["bytes"], "received": stats["rx"]["bytes"]}


def status(name: str = NAME) -> dict | None:
    """What runs: nodes, addresses, rate, link state, bytes, processes per node; None if down."""
    cluster = find(name)
    if cluster is None:
        return None
    nodes = []
    for i in range(cluster.nodes):
        ns = cluster.namespace(i)
        out = _run("ip", "-j", "-n", ns, "link", "show", "dev", LINK, check=False)
        state = json.loads(out)[0].get("operstate", "?") if out.strip() else "missing"
        nodes.append(
            {
                "node": cluster.hostname(i),
                "namespace": ns,
                "address": cluster.address(i),
                "link": state,
                "processes": len(pids(ns)),
                **(link_bytes(cluster, i) if out.strip() else {}),
            }
        )
    return {"name": cluster.name, "rate": cluster.rate, "nodes": nodes}
