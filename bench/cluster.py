"""herald on a 3-node RabbitMQ cluster: the node that leads the email queue killed under load.

Starts three RabbitMQ nodes on this machine (their own node names, ports, data and
log directories, config, an empty plugin list and a shared Erlang cookie; never the
node on 5672), joins them into one cluster, declares a fresh ``HERALD_PREFIX`` (its
quorum work queues get a member on each node), starts email workers as a user starts
them (``python -m consumers email`` with ``HERALD_AMQP_URL`` listing the three nodes),
and publishes events to the events exchange at a steady rate with publisher confirms,
re-publishing whatever was not confirmed. Once a share of them has reached the mail
sink, it ``kill -9``s the node that leads ``<prefix>.email``, then reports what the
sink received: lost (target 0), duplicates, and the time from the kill to the next
delivered email and to the end of the longest stall. Recovery time has no target: on
2 shared cores it mostly measures CPU starvation.

    uv run python -m bench.cluster [--events 2000] [--workers 2] [--rate 100]
                                   [--kill-at 0.33] [--database sqlite|postgresql]
                                   [--log-dir DIR]

Prints a table and exits 0 (also when a RabbitMQ binary is missing: it says why);
1 when it could not run to the end. Everything it started is stopped and its
directories deleted at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/cluster.py`` as well as ``-m bench.cluster``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aio_pika.abc import AbstractRobustConnection

from bench.common import Broker, SinkThread, TimedSink, free_port, print_table
from bench.workers import CHANNEL, Stage
from herald.amqp import connect
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message

EVENT = "user.signup"  # routed to the email channel only
TOOLS = ("rabbitmq-server", "rabbitmqctl")
#: Debian/Ubuntu put root-only wrappers in /usr/sbin that switch to the rabbitmq user (and
#: so to its HOME and cookie); the scripts they call take our environment as it is.
TOOL_DIRS = (Path("/usr/lib/rabbitmq/bin"),)


# ---------------------------------------------------------------- the cluster


def find_tools() -> tuple[Path | None, str]:
    """The directory holding rabbitmq-server and rabbitmqctl, or None and why not."""
    if shutil.which("erl") is None:
        return None, "no Erlang runtime (erl) on PATH"
    candidates = [*TOOL_DIRS]
    found = shutil.which("rabbitmqctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    for directory in candidates:
        if all((directory / tool).is_file() and os.access(directory / tool, os.X_OK)
               for tool in TOOLS):
            return directory, ""
    return None, f"no {' and '.join(TOOLS)} found (looked in {', '.join(map(str, candidates))})"


@dataclass
class Node:
    """One RabbitMQ node of the bench's cluster."""

    name: str  #: ``herald-c1-<run>@localhost``
    port: int  #: AMQP
    dist_port: int  #: Erlang distribution (clustering, CLI tools)
    home: Path  #: its own directory (config, data, logs)
    process: subprocess.Popen[bytes] | None = None
    os_pid: int | None = None  #: the beam.smp process, once running
    killed: bool = False


@dataclass
class Cluster:
    """Three nodes on 127.0.0.1, all under ``base`` (deleted by :meth:`destroy`)."""

    tools: Path
    base: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        run = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
        (self.base / "home").mkdir(parents=True)
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (self.base / "enabled_plugins").write_text("[].\n")  # no management plugin
        for i in range(1, self.size + 1):
            node = Node(f"herald-c{i}-{run}@localhost", free_port(), free_port(),
                        self.base / f"node{i}")
            for sub in ("mnesia", "log"):
                (node.home / sub).mkdir(parents=True)
            (node.home / "rabbitmq.conf").write_text(
                "log.console = false\nlog.file.level = info\n")
            (node.home / "rabbitmq-env.conf").write_text("")
            self.nodes.append(node)

    @property
    def url(self) -> str:
        """``HERALD_AMQP_URL`` naming every node."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"amqp://guest:guest@{hosts}/"

    def env(self, node: Node | None = None) -> dict[str, str]:
        """The environment of a node (``node``) or of a CLI tool (None): our HOME, and so
        our cookie; none of the machine's RabbitMQ settings (``/etc/rabbitmq``)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env["HOME"] = str(self.base / "home")
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.base / "none.conf")
        if node is not None:
            env.update({
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.home / "log"),
                "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.home / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(node.home / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(node.home / "rabbitmq.pid"),
                # Distribution on loopback only, as the shared node is configured.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                    "-kernel inet_dist_use_interface {127,0,0,1}",
            })
        return env

    async def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl",
                  timeout: float = 180.0) -> str:
        """Run ``tool -n <node> ARGS`` (always our node, never the default one); its output."""
        process = await asyncio.create_subprocess_exec(
            str(self.tools / tool), "-n", node.name, *args, env=self.env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"{tool} -n {node.name} {' '.join(args)} exited "
                               f"{process.returncode}: {(err or out).decode().strip()[-600:]}")
        return out.decode()

    async def start(self) -> float:
        """Start the nodes, join them into one cluster; seconds it took."""
        began = time.monotonic()
        for node in self.nodes:
            log = (node.home / "log" / "server.out").open("ab")
            node.process = subprocess.Popen(
                [str(self.tools / "rabbitmq-server")], env=self.env(node), cwd=node.home,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own group: Ctrl-C reaches it only through us
            log.close()
        await asyncio.gather(*(self.wait_up(n) for n in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await self.ctl(node, "stop_app")
            await self.ctl(node, "reset")
            await self.ctl(node, "join_cluster", first.name)
            await self.ctl(node, "start_app")
        status = json.loads(await self.ctl(first, "cluster_status", "--formatter", "json"))
        running = set(status.get("running_nodes", []))
        if running != {n.name for n in self.nodes}:
            raise RuntimeError(f"cluster did not form: running {sorted(running)}")
        for node in self.nodes:
            node.os_pid = int((await self.ctl(node, "eval", "os:getpid().")).strip().strip('"'))
        return time.monotonic() - began

    async def wait_up(self, node: Node, timeout: float = 240.0) -> None:
        """Return once ``node`` runs RabbitMQ; raise with its log's tail if it exits or
        takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited with {node.process.returncode}:\n"
                                   f"{self.log_tail(node)}")
            try:
                await self.ctl(node, "await_startup", "--timeout", "60", timeout=90)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} not up within {timeout:.0f} s:\n"
                                       f"{self.log_tail(node)}") from None
                await asyncio.sleep(1)

    def log_tail(self, node: Node, lines: int = 20) -> str:
        """The last lines of the node's console output."""
        with contextlib.suppress(OSError):
            text = (node.home / "log" / "server.out").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def live(self) -> list[Node]:
        """Nodes not killed."""
        return [n for n in self.nodes if not n.killed]

    def by_name(self, name: str) -> Node:
        """The node called ``name``."""
        return next(n for n in self.nodes if n.name == name)

    async def queue(self, name: str) -> dict[str, Any]:
        """``list_queues name type members leader online messages state`` of queue
        ``name``, asked of a live node."""
        rows = json.loads(await self.ctl(self.live()[0], "list_queues", "--formatter", "json",
                                         "name", "type", "members", "leader", "online",
                                         "messages", "state"))
        for row in rows:
            if row.get("name") == name:
                return dict(row)
        raise RuntimeError(f"queue {name!r} not found on the cluster")

    async def connections(self) -> list[tuple[str, str]]:
        """(node, connection name) of every client connection (the node told by the AMQP
        port the client connected to: ours are all different)."""
        rows = json.loads(await self.ctl(self.live()[0], "list_connections", "--formatter",
                                         "json", "port", "client_properties"))
        by_port = {n.port: n.name for n in self.nodes}
        found: list[tuple[str, str]] = []
        for row in rows:
            props = row.get("client_properties") or []
            name = next((p[2] for p in props if isinstance(p, list) and len(p) == 3
                         and p[0] == "connection_name"), "")
            found.append((by_port.get(int(row.get("port", 0)), "?"), str(name)))
        return found

    def kill(self, node: Node) -> None:
        """``kill -9`` the node's Erlang VM, after checking that the pid is really ours."""
        assert node.os_pid is not None
        cmdline = Path(f"/proc/{node.os_pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if str(self.base).encode() not in cmdline:  # its -home is our directory
            raise RuntimeError(f"pid {node.os_pid} is not {node.name}: refusing to kill it")
        os.kill(node.os_pid, signal.SIGKILL)
        node.killed = True

    async def stop(self) -> None:
        """Stop every node (SIGTERM to its process group: a clean shutdown), SIGKILL after
        30 s; only the processes this cluster started."""
        running = [n for n in self.nodes if n.process and n.process.poll() is None]
        for node in running:
            with contextlib.suppress(ProcessLookupError):
                assert node.process is not None
                os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(n.process and n.process.poll() is None for n in running):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL whatever of the nodes is left (synchronous: the last-resort clean-up)."""
        for node in self.nodes:
            if node.process is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.process.pid, signal.SIGKILL)  # its own group, nothing else
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(10)

    def destroy(self) -> None:
        """Kill what is left and delete every directory of the cluster."""
        self.kill_all()
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------- load


def make_envelope(run: str, i: int) -> Envelope:
    """A signup of user ``i`` (a fresh event id)."""
    user = f"u{i}"
    return Envelope(type=EVENT, actor=Actor(id=user, name=f"User {i}"),
                    recipients=[Recipient(user_id=user, email=f"user{i}@{run}.example.com",
                                          name=f"User {i}")],
                    data={"name": f"User {i}"})


@dataclass
class Publisher:
    """Publishes envelopes at ``rate``/s with confirms (mandatory, like the relay); what was
    not confirmed (nack, timeout, connection lost) is published again, same id."""

    connection: AbstractRobustConnection
    exchange_name: str
    rate: float
    confirmed: set[str] = field(default_factory=set)
    republished: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    async def run(self, envelopes: Sequence[Envelope]) -> None:
        """Return once every envelope is confirmed."""
        todo = list(envelopes)
        batch = max(1, round(self.rate / 10))  # ten batches a second
        while todo:
            chunk, todo = todo[:batch], todo[batch:]
            began = time.monotonic()
            failed = await self._publish(chunk)
            if failed:
                self.republished += len(failed)
                todo = failed + todo
                await asyncio.sleep(0.5)  # let the robust connection come back
            await asyncio.sleep(max(0.0, len(chunk) / self.rate - (time.monotonic() - began)))

    async def _publish(self, chunk: Sequence[Envelope]) -> list[Envelope]:
        try:
            channel = await asyncio.wait_for(
                self.connection.channel(publisher_confirms=True, on_return_raises=True), 10)
            try:
                exchange = await channel.get_exchange(self.exchange_name, ensure=False)
                results = await asyncio.gather(*(
                    exchange.publish(build_message(e.to_json(), e.id, e.type), routing_key=e.type,
                                     mandatory=True, timeout=10)
                    for e in chunk), return_exceptions=True)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), 5)
        except Exception as exc:  # the channel itself: the connection is down
            self.failures[type(exc).__name__] += 1
            return list(chunk)
        failed: list[Envelope] = []
        for envelope, result in zip(chunk, results, strict=True):
            if isinstance(result, BaseException):
                self.failures[type(result).__name__] += 1
                failed.append(envelope)
            else:
                self.confirmed.add(envelope.id)
        return failed


# ---------------------------------------------------------------- the run


def event_id(message: Any) -> str:
    """The event id in an email's Message-ID (``<event_id.user_id@herald>``)."""
    return str(message.get("Message-ID", "")).strip("<>").split(".", 1)[0]


def secs(value: float | None) -> str:
    """Seconds, one decimal, or a dash."""
    return "-" if value is None else f"{value:.1f} s"


def first_after(times: Sequence[float], start: float) -> float | None:
    """Seconds from ``start`` to the first of ``times`` after it."""
    after = [t for t in times if t > start]
    return min(after) - start if after else None


def longest_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest silence between ``start`` and ``end`` (the edges count as events)."""
    inside = sorted(t for t in times if start < t < end)
    edges = [start, *inside, end]
    return max(b - a for a, b in pairwise(edges))


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_EMAILED = re.compile(r"event (\S+) \(\S+\) emailed to")
_NO_ACK = re.compile(r"could not ack message (\S+)")


def resumed_after_loss(log: str) -> float | None:
    """When (epoch seconds) a worker whose connection was lost settled a message again: its
    first email after the loss that it could ack, or its first redelivery skipped as
    already sent. None when its connection was never lost."""
    lines = log.splitlines()
    lost = next((i for i, line in enumerate(lines) if "connection lost" in line), None)
    if lost is None:
        return None
    unacked = {m.group(1) for line in lines[lost:] if (m := _NO_ACK.search(line))}
    for line in lines[lost + 1:]:
        stamp = _STAMP.match(line)
        emailed = _EMAILED.search(line)
        if stamp and (("already settled" in line)
                      or (emailed is not None and emailed.group(1) not in unacked)):
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


async def bench(args: argparse.Namespace) -> int:
    """The whole run; the exit code."""
    tools, why = find_tools()
    if tools is None:
        print(f"bench.cluster: skipped: {why}")
        return 0
    interrupts = Interrupts()
    # herald's own one-line warnings (a lost connection, the next broker); not the
    # tracebacks aiormq and aio-pika log for every connection the kill drops.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    base = Path(tempfile.mkdtemp(prefix="herald-cluster-"))
    cluster = Cluster(tools, base)
    rows: list[tuple[str, ...]] = [("figure", "value")]
    try:
        print(f"starting 3 RabbitMQ nodes under {base} ...", flush=True)
        took = await cluster.start()
        rows.append(("cluster", f"{', '.join(n.name for n in cluster.nodes)} "
                                f"(AMQP {', '.join(str(n.port) for n in cluster.nodes)}); "
                                f"formed in {took:.1f} s"))
        code = await run_load(args, cluster, rows, interrupts)
    except Exception as exc:
        traceback.print_exc()
        rows.append(("error", repr(exc)[:300]))
        code = 1
    finally:
        print("stopping the cluster, deleting its directories ...", flush=True)
        with contextlib.suppress(Exception):
            await cluster.stop()
        cluster.destroy()
    rows.append(("load average (/proc/loadavg)", Path("/proc/loadavg").read_text().strip()))
    print_table(f"3-node cluster, leader of the email queue killed ({args.events} events, "
                f"{args.workers} workers)", rows)
    return code


async def run_load(args: argparse.Namespace, cluster: Cluster, rows: list[tuple[str, ...]],
                   interrupts: Interrupts) -> int:
    """Workers, load, kill, figures (appended to ``rows``); the exit code."""
    log_dir = Path(args.log_dir) if args.log_dir else cluster.base / "logs"
    async with Broker(cluster.url) as broker:
        stage = Stage("cluster", args.database, broker, log_dir, cluster.base / "scratch")
        async with stage:
            sink = stage.enter(SinkThread(TimedSink()))
            stage.configure(HERALD_AMQP_URL=cluster.url, HERALD_SMTP_URL=sink.url,
                            HERALD_EMAIL_RATE_LIMIT="10000/s", HERALD_LOG_LEVEL="INFO")
            # Declared now that the cluster has formed: each quorum queue gets a member on
            # every node (the default initial group size is the cluster's size).
            async with interrupts.critical():
                await stage.prepare()
            work = stage.names.work(CHANNEL)
            queue = await cluster.queue(work)
            members = list(queue.get("members", []))
            rows.append((f"{work} ({queue.get('type')})",
                         f"{len(members)} members, leader {queue.get('leader')}"))
            if len(members) != len(cluster.nodes):
                raise RuntimeError(f"{work} is not replicated on every node: {members}")
            leader = cluster.by_name(str(queue["leader"]))
            async with interrupts.critical():
                await stage.start_workers(args.workers)
            clients = [node for node, name in await cluster.connections()
                       if not name.startswith("herald bench")]

            envelopes = [make_envelope(stage.prefix, i) for i in range(args.events)]
            publishing = await connect(cluster.url, name="herald bench publisher")
            load: asyncio.Task[None] | None = None
            try:
                publisher = Publisher(publishing, stage.names.events, args.rate)
                began = time.monotonic()
                load = asyncio.create_task(publisher.run(envelopes))
                threshold = max(1, int(args.events * args.kill_at))
                while len(sink.sink.messages) < threshold:
                    if load.done() and load.exception() is not None:
                        raise RuntimeError("publisher failed") from load.exception()
                    if time.monotonic() - began > args.timeout:
                        raise RuntimeError(f"fewer than {threshold} emails in {args.timeout:.0f} s")
                    await asyncio.sleep(0.01)
                delivered_at_kill = len(sink.sink.messages)
                confirmed_at_kill = len(publisher.confirmed)
                killed_at, killed_wall = time.monotonic(), time.time()
                cluster.kill(leader)
                print(f"killed {leader.name} (pid {leader.os_pid}) after {delivered_at_kill} "
                      "emails", flush=True)

                await asyncio.wait_for(load, args.timeout)
                published_at = time.monotonic()
                wanted = {e.id for e in envelopes}

                def received() -> set[str]:
                    return {event_id(m) for m in list(sink.sink.messages)}

                deadline = time.monotonic() + args.timeout
                while not wanted <= received() and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                all_in = time.monotonic()
                await asyncio.sleep(args.settle)  # late duplicates
            finally:  # also when interrupted
                if load is not None and not load.done():
                    load.cancel()
                    await asyncio.gather(load, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(publishing.close(), 10)

            after = await cluster.queue(work)
            dlq = await cluster.queue(stage.names.dlq(CHANNEL))
            ids = [event_id(m) for m in list(sink.sink.messages)]
            counts = Counter(ids)
            times = sorted(sink.sink.accepted_at)
            window = min(args.window, killed_at - times[0])
            gap_before = longest_gap(times, killed_at - window, killed_at)
            gap_after = longest_gap(times, killed_at, killed_at + window)
            lost = len(publisher.confirmed - set(counts))
            moved = [w for w in stage.workers if w.count("connection lost")]
            resumed = [r - killed_wall for w in moved if (r := resumed_after_loss(w.log()))]
            rows += [
                ("worker connections on the killed node",
                 f"{clients.count(leader.name)} of {len(clients)}"),
                ("killed", f"{leader.name} after {delivered_at_kill} emails "
                           f"({confirmed_at_kill} confirmed)"),
                ("new leader", f"{after.get('leader')} (online: "
                               f"{', '.join(map(str, after.get('online', [])))})"),
                ("sent (confirmed)", str(len(publisher.confirmed))),
                ("re-published (not confirmed)", f"{publisher.republished} "
                                                 f"{dict(publisher.failures) or ''}".strip()),
                ("received by the sink (unique Message-IDs)", str(len(counts))),
                ("lost (target 0)", str(lost)),
                ("duplicates", str(sum(n - 1 for n in counts.values() if n > 1))),
                # A classic queue lives on one node: "down" when that was the killed one.
                ("in the DLQ (classic queue)", str(dlq.get("messages"))
                 if dlq.get("state") == "running" else f"unknown: queue {dlq.get('state')} "
                                                       "(it lived on the killed node)"),
                ("kill -> next delivered email (any worker)", secs(first_after(times, killed_at))),
                ("kill -> a worker that lost its node settles again",
                 ", ".join(secs(r) for r in resumed) or "-"),
                (f"longest pause in deliveries, {window:.0f} s before / after the kill",
                 f"{secs(gap_before)} / {secs(gap_after)}"),
                ("publishing took", secs(published_at - began)),
                ("first publish -> all delivered", secs(all_in - began)
                 if wanted <= set(counts) else f"not all within {args.timeout:.0f} s"),
            ]
            if not await ensure_connected(broker):
                print("the bench's broker connection did not come back; topology left to "
                      "the cluster's deletion", file=sys.stderr)
                stage.settings = None
    return 0


async def ensure_connected(broker: Broker, timeout: float = 30.0) -> bool:
    """True once the bench's own connection is up again (it may have been on the killed
    node), so that the clean-up can delete the topology."""
    assert broker.connection is not None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(broker.connection.connected.wait(), timeout)
    return broker.connection.connected.is_set()


class Interrupts:
    """Ctrl-C or SIGTERM cancels the run once, so that every clean-up runs to its end
    (repeats are ignored: ``uv run`` forwards a signal the process group already got).

    Inside :meth:`critical` the cancel waits for the block to end: a cancel in the
    middle of spawning a worker or ``herald db init`` would leave that process running
    with nobody to stop it.
    """

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.requested = False
        self.depth = 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.requested:
            return
        self.requested = True
        print(f"\n{sig.name}: stopping; cleaning up (workers, nodes, directories)",
              file=sys.stderr)
        if self.depth == 0:
            self.task.cancel()

    @contextlib.asynccontextmanager
    async def critical(self) -> AsyncIterator[None]:
        """Run the block to its end even when interrupted; the interrupt then raises."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.requested and self.depth == 0:
            raise asyncio.CancelledError("interrupted")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="events to publish (2000)")
    parser.add_argument("--workers", type=int, default=2, help="email worker processes (2)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="events published per second (100)")
    parser.add_argument("--kill-at", type=float, default=0.33,
                        help="kill the leader once this share of the emails arrived (0.33)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for each phase (300)")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds before and after the kill to look for pauses (10)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to keep watching for duplicates at the end (2)")
    parser.add_argument("--log-dir", help="keep the workers' logs here (default: deleted)")
    args = parser.parse_args()
    try:
        code = asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted (cleaned up)", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
