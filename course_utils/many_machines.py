"""Many machines (lesson 14): DDP across the nodes of the one-machine cluster
(:mod:`course_utils.cluster`), the probes the lesson runs there, and the arithmetic it predicts
them with: the lesson's own cluster (:func:`bring_up`, :func:`take_down`); what the link must
carry (:func:`gradient_bytes`, :func:`ring_link_bytes`, :func:`predicted_sent`) and how long a
step takes at a link rate, by lesson 04's alpha-beta model (:func:`alpha_beta_step`) and through
a token bucket (:func:`bucket_step`); DDP under torchrun with the bytes on each link
(:func:`ddp_run`), at several rates in turns (:func:`step_sweep`); and a node killed mid-run, the
job going on without it (:func:`survive_node_loss`), told from the agents' logs
(:func:`timeline`).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from tqdm.auto import tqdm

from course_utils import cluster, collectives, measure, models
from course_utils.cluster import Cluster, torchrun

NAME = "lesson"  # the lesson's cluster: namespaces lesson-node0, lesson-node1, lesson-switch
UNLIMITED = "unlimited"  # a rate label: no token bucket on the link
AGENT_TIMEOUT_S = 300.0  # a job the lesson starts must end by then (seconds)
SAVED = "checkpoint: step"  # how the entry point announces a checkpoint
# TCP's bytes on the wire per byte it carries: a 1500-byte packet holds 1448 bytes of data after
# the IP and TCP headers (20 + 32, with timestamps), and leaves as a 1514-byte Ethernet frame.
# A wire, and a token bucket, charge the whole frame.
WIRE = (1500 + 14) / (1500 - 20 - 32)
# a torchrun agent's log line: glog's level, date, time of day, pid, source, message
AGENT_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ \S+\] (.*)$")


# --- the lesson's cluster -------------------------------------------------------------------


def bring_up(name: str = NAME, nodes: int = 2, rate: str | None = "1gbit") -> Cluster | None:
    """The lesson's cluster, made fresh, or None where none can be made here
    (:func:`course_utils.cluster.unavailable` says why). A cluster of the same name left by a
    crashed kernel is removed first, and this one is taken down when the interpreter exits."""
    if cluster.unavailable() is not None:
        return None
    cluster.down(name)
    made = cluster.up(Cluster(name, nodes, rate))
    atexit.register(cluster.down, name)
    return made


def take_down(name: str = NAME) -> list[str]:
    """Remove the lesson's cluster (processes, namespaces, links); what of it is left (none)."""
    if cluster.unavailable() is None:
        cluster.down(name)
        return cluster.existing(name)
    return []


# --- what the link must carry, and how long it takes ----------------------------------------


def gradient_bytes(model: str = "cnn") -> int:
    """Bytes of one float32 gradient of the course's ``model``: what DDP all-reduces per step."""
    built = models.MODELS[model]()
    return collectives.FLOAT32_BYTES * sum(p.numel() for p in built.parameters())


def ring_link_bytes(grad_bytes: float, nodes: int, workers_per_node: int = 1) -> float:
    """Bytes each node sends over its link per step, in a ring all-reduce over every worker
    ordered by rank (a node's workers consecutive): only the node's last worker sends to another
    node, ``2(n-1)/n`` of the gradient; its other workers' share stays on the node's loopback."""
    return collectives.ring_bytes_sent(grad_bytes, nodes * workers_per_node) if nodes > 1 else 0.0


def ring_loopback_bytes(grad_bytes: float, nodes: int, workers_per_node: int = 1) -> float:
    """Bytes the workers of one node send each other over its loopback per step (same ring)."""
    world = nodes * workers_per_node
    inside = workers_per_node - 1 if nodes > 1 else workers_per_node * (world > 1)
    return inside * collectives.ring_bytes_sent(grad_bytes, world)


def predicted_sent(grad_bytes: float, steps: int, node: int, world_size: int = 2) -> float:
    """Bytes a node's link sends in a DDP run of ``steps``, one worker per node: the ring's share
    of every step's gradient, and once, on node 0 (rank 0), DDP's broadcast of the weights."""
    return steps * collectives.ring_bytes_sent(grad_bytes, world_size) + grad_bytes * (node == 0)


def link_seconds(nbytes: float, rate: str) -> float:
    """Seconds ``nbytes`` take at ``rate`` (tc's units), a byte after another."""
    return 0.0 if rate == UNLIMITED else nbytes / cluster.rate_bytes(rate)


def alpha_beta_step(
    compute_s: float, grad_bytes: float, world_size: int, rate: str, alpha: float = 0.0
) -> float:
    """A DDP step by lesson 04's model: the compute, then the ring all-reduce of the gradient,
    ``2(n-1) alpha + 2(n-1)/n bytes / beta``, its bytes as TCP puts them on the wire
    (:data:`WIRE`) and the link's rate as the bandwidth ``beta``. ``alpha`` 0: the messages'
    latency is already in a ``compute_s`` measured on a fast link."""
    if rate == UNLIMITED:
        return compute_s
    return compute_s + collectives.ring_cost(
        WIRE * grad_bytes, world_size, alpha, cluster.rate_bytes(rate)
    )


def bucket_step(compute_s: float, grad_bytes: float, world_size: int, rate: str) -> float:
    """A DDP step through a token bucket: while the workers compute, the idle link saves up
    tokens (``rate`` a second, at most :func:`course_utils.cluster.burst_bytes`), and that credit goes out at once;
    the rest of the ring's bytes on the wire (:data:`WIRE`) at the rate. Slow links (``rate x
    compute`` below the burst) are busy the whole step: ``bytes / rate``, the compute hidden."""
    if rate == UNLIMITED:
        return compute_s
    sent = WIRE * collectives.ring_bytes_sent(grad_bytes, world_size)
    speed = cluster.rate_bytes(rate)
    credit = min(cluster.burst_bytes(rate), speed * compute_s)
    return compute_s + max(0.0, sent - credit) / speed


def rejoin_seconds(rdzv_conf: str = torchrun.RDZV_CONF) -> float:
    """How long a c10d rendezvous takes to go on without a lost node, by its settings: the
    missed heartbeats that declare it dead, then the last call for late joiners."""
    conf = dict(item.split("=") for item in rdzv_conf.split(",") if item)
    beats = float(conf.get("keep_alive_interval", 5)) * int(conf.get("keep_alive_max_attempt", 3))
    return beats + float(conf.get("last_call_timeout", 30))


# --- probes on a running cluster ------------------------------------------------------------


def train_args(steps: int, batch_size: int, out: Path, *more: str) -> list[str]:
    """The entry point's flags for the lesson's run: the CNN, DDP, the JSON written to ``out``."""
    flags = ["--model", "cnn", "--parallel", "ddp", "--steps", str(steps)]
    return flags + ["--batch-size", str(batch_size), "--json", str(out), *more]


def _follow(
    made: Cluster, job: torchrun.Job, on_line: Callable | None = None,
    on_poll: Callable | None = None, poll_s: float = 0.05, timeout: float = AGENT_TIMEOUT_S,
) -> tuple[list[dict], list[tuple[float, int]]]:  # fmt: skip
    """Watch a job until its agents end: every line of every node's log, stamped when it was
    read (``t``, seconds from now) or by the agent's own clock, and the bytes node 1's link has
    sent, sampled every ``poll_s`` while its agent lives (the ``trace``). Calls
    ``on_line(line)`` for each line and ``on_poll(trace)`` after each sample."""
    start, wall = time.monotonic(), datetime.now()
    day_s = wall.hour * 3600 + wall.minute * 60 + wall.second + wall.microsecond / 1e6
    seen = {node: 0 for node in job.logs}
    base = cluster.link_bytes(made, 1)["sent"]
    lines, trace = [], []
    while True:
        running = any(agent.poll() is None for agent in job.agents.values())
        now = time.monotonic() - start
        sent = _sent_by(job.agents[1].pid, made.namespace(1)) if 1 in job.agents else None
        if sent is not None:
            trace.append((now, sent - base))
        for node in job.logs:
            text = job.log(node)
            done = text[: text.rfind("\n") + 1][seen[node] :]
            seen[node] += len(done)
            for raw in done.splitlines():
                lines.append(read_line(raw, node, now, day_s))
                if on_line:
                    on_line(lines[-1])
        if on_poll and trace:
            on_poll(trace)
        if not running:
            return lines, trace
        if now > timeout:
            job.stop()
            raise TimeoutError(f"the job did not end in {timeout:.0f} s: {job.log(0)[-500:]}")
        time.sleep(poll_s)


def _sent_by(pid: int, namespace: str) -> int | None:
    """Bytes sent so far on the link of ``namespace`` (a node), read through a process ``pid``
    in it (``/proc/PID/net/dev``: a file read, cheaper than a command while timing); None while
    the process is not (yet, or any more) in that namespace."""
    try:
        here = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
        rows = Path(f"/proc/{pid}/net/dev").read_text().splitlines() if here else []
    except OSError:
        return None
    for row in rows:
        name, _, counters = row.partition(":")
        if name.strip() == cluster.LINK:
            return int(counters.split()[8])  # received: 8 counters, then sent: bytes first
    return None


def read_line(raw: str, node: int, now: float, day_s: float) -> dict:
    """One line of a node's log: its ``text``, ``node`` and time ``t`` (s), read ``now``; an
    agent's line (glog's form) carries its own time of day, taken instead, relative to
    ``day_s`` (the second of the day when the job started), and its ``agent`` message."""
    line = {"t": now, "node": node, "text": raw}
    stamp = AGENT_LINE.match(raw)
    if stamp:  # to the microsecond, by the agent's clock
        hours, minutes, seconds, message = stamp.groups()
        clock = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        line |= {"t": (clock - day_s) % 86400, "agent": message}
    return line


def ddp_run(
    made: Cluster, folder: str | Path, steps: int, batch_size: int = 64,
    progress: str | None = None, **options,
) -> dict:  # fmt: skip
    """DDP across every node of ``made`` (``options`` to :func:`course_utils.cluster.torchrun.job`:
    static rendezvous and one worker per node by default): the run's JSON (``result``), the
    bytes each node's link ``sent`` and ``received`` during it, the mean ``step_s`` after the
    first step (``batch_size / samples_per_s``) and node 1's bytes over time (``trace``)."""
    folder = Path(tempfile.mkdtemp(prefix="ddp-", dir=folder))
    out = folder / "run.json"
    before = [cluster.link_bytes(made, i) for i in range(made.nodes)]
    expected = predicted_sent(gradient_bytes(), steps, 1, made.nodes)
    bar = tqdm(total=round(expected / 1e6, 1), desc=progress, unit="MB", disable=progress is None)
    job = torchrun.job(made, train_args(steps, batch_size, out), logs=folder, **options)

    def megabytes(trace: list) -> None:  # the bar: what node 1 has sent so far
        bar.update(max(0.0, round(trace[-1][1] / 1e6, 1) - bar.n))

    try:
        _, trace = _follow(made, job, on_poll=megabytes)
        result = torchrun.results(job, 10, out)
    finally:
        job.stop()
        bar.close()
    after = [cluster.link_bytes(made, i) for i in range(made.nodes)]
    moved = {key: [a[key] - b[key] for a, b in zip(after, before)] for key in after[0]}
    step_s = batch_size / result["samples_per_s"]
    return {"result": result, **moved, "step_s": step_s, "trace": trace, "folder": folder}


def step_sweep(
    made: Cluster, folder: str | Path, rates: Sequence[str], steps: int, batch_size: int = 64,
    repeats: int = 1, progress: str | None = None, earlier: dict | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """:func:`ddp_run` at every rate (tc's units, or :data:`UNLIMITED`), in turns, ``repeats``
    rounds: a Spread of ``step_s`` per rate, and each rate's last run. ``earlier``: ``{rate:
    run}`` of the same settings already measured, each counted as its rate's first round (one
    job fewer). The link is left at the rate it had."""
    earlier = earlier or {}
    samples = {rate: [] for rate in rates}
    last = dict(earlier)
    bar = tqdm(total=repeats * len(rates) - len(earlier), desc=progress, disable=progress is None)
    try:
        for round_ in range(repeats):
            for rate in rates:
                if round_ == 0 and rate in earlier:
                    samples[rate].append(earlier[rate]["step_s"])
                    continue
                bar.set_postfix_str(rate)
                cluster.set_rate(made, None if rate == UNLIMITED else rate)
                last[rate] = ddp_run(made, folder, steps, batch_size)
                samples[rate].append(last[rate]["step_s"])
                bar.update()
    finally:
        cluster.set_rate(made, made.rate)
        bar.close()
    return {rate: measure.spread(values) for rate, values in samples.items()}, last


def survive_node_loss(
    made: Cluster, folder: str | Path, steps: int, every: int, batch_size: int = 64,
    node: int = 1, progress: str | None = None,
) -> dict:  # fmt: skip
    """An elastic job (c10d rendezvous, ``--nnodes 1:N``, two restarts, a checkpoint every
    ``every`` steps) whose ``node`` is killed (:func:`course_utils.cluster.kill_node`, a machine
    losing power) as soon as the first checkpoint is saved. Returns the survivor's JSON
    (``result``), ``killed_at`` (s), the agents' exit ``codes``, every log line stamped
    (``lines``, :func:`read_line`) and their :func:`timeline` (``events``)."""
    folder = Path(tempfile.mkdtemp(prefix="elastic-", dir=folder))
    out = folder / "run.json"
    extra = ("--checkpoint", str(folder / "checkpoint"), "--checkpoint-every", str(every))
    killed = {}
    bar = tqdm(total=steps, desc=progress, unit="step", disable=progress is None)

    def on_line(line: dict) -> None:
        if line["text"].startswith(SAVED):
            bar.update(int(line["text"].split()[2]) - bar.n)
            if not killed:
                killed["at"] = line["t"]
                cluster.kill_node(made, node)

    job = torchrun.job(
        made, train_args(steps, batch_size, out, *extra), logs=folder, rdzv="c10d",
        nnodes=f"1:{made.nodes}", max_restarts=2, env={"LOGLEVEL": "INFO"},
    )  # fmt: skip
    try:
        lines, _ = _follow(made, job, on_line=on_line)
        result = torchrun.results(job, 10, out, lost=node)
    finally:
        job.stop()
        bar.close()
    codes = {n: agent.returncode for n, agent in job.agents.items()}
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return {
        "result": result, "killed_at": killed.get("at"), "codes": codes, "lines": lines,
        "events": timeline(lines, killed.get("at"), node),
    }  # fmt: skip


def timeline(lines: Sequence[dict], killed_at: float | None = None, node: int = 1) -> list[dict]:
    """The story of an elastic job, in time order, from its stamped log lines: each
    ``rendezvous`` (its ``round`` and the ``nodes`` in it), ``checkpoint`` (its ``step``),
    ``killed`` (``node``, at ``killed_at``), ``failed`` (a worker's exit noticed by its agent),
    ``finished``. Each event: ``t`` (s), ``node``, ``event`` and its details."""
    events, pending = [], {}
    for line in lines:
        text, message, where = line["text"], line.get("agent", ""), line["node"]
        if "Rendezvous complete" in message:
            pending[where] = {"t": line["t"], "node": where, "event": "rendezvous"}
        elif where in pending and message.strip().startswith("restart_count="):
            pending[where]["round"] = int(message.split("=")[1])
        elif where in pending and message.strip().startswith("group_world_size="):
            events.append(pending.pop(where) | {"nodes": int(message.split("=")[1])})
        elif text.startswith(SAVED):
            events.append({"t": line["t"], "node": where, "event": "checkpoint"})
            events[-1]["step"] = int(text.split()[2])
        elif "failed (exitcode" in message:
            events.append({"t": line["t"], "node": where, "event": "failed"})
        elif "worker group successfully finished" in message:
            events.append({"t": line["t"], "node": where, "event": "finished"})
    if killed_at is not None:
        events.append({"t": killed_at, "node": node, "event": "killed"})
    return sorted(events, key=lambda e: e["t"])
