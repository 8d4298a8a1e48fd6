"""The process-wide runtime behind the public API: rendezvous, the fabric, groups.

A :class:`Runtime` registers this rank's transport address with the coordinator, learns the
peer table (in an *open* job, world size 0, whoever has joined so far: processes join whenever
they start, their ranks drawn from the coordinator's counter, and only groups run collectives),
knows the world's fabric (a topology file, one probed at init, or a flat model of the hosts;
an open job's groups plan on their members' hosts) and forms :class:`~collcomm.runtime.group.Group` objects, whose operations the
collectives (:mod:`collcomm.runtime.collectives`), alltoall and point-to-point messages
(:mod:`collcomm.runtime.p2p`) run; shrink and grow live in :mod:`collcomm.runtime.membership`.
"""

from __future__ import annotations

import hashlib
import os
import socket

from collcomm.coordinator.client import CoordinatorClient
from collcomm.errors import CollectiveError, UsageError, UsageTypeError
from collcomm.faults import inject
from collcomm.runtime import arguments, local_settings, membership
from collcomm.runtime.executor import DEFAULT_CHUNK_BYTES
from collcomm.runtime.group import Group
from collcomm.runtime.membership import WORLD_GROUP
from collcomm.runtime.p2p import MessageNumbers
from collcomm.schedules.planner import flat_topology, restrict
from collcomm.topology import jsonio
from collcomm.topology.model import Topology
from collcomm.transport.shm import segment as shm_segment
from collcomm.transport.tcp import TcpTransport

DEFAULT_TIMEOUT = 300.0
OPEN_RANKS_KEY = "open/ranks"  # the counter an open job's processes draw their ranks from


MAX_CHUNK_BYTES = 1 << 30  # the largest piece of a collective on the wire (COLLCOMM_CHUNK_BYTES, init(chunk_bytes=))


def _chunk_bytes(value) -> int | None:
    """``init(chunk_bytes=...)``: None (COLLCOMM_CHUNK_BYTES or the default) or 1..MAX_CHUNK_BYTES."""
    if value is None:
        return None
    n = arguments.integer(value, "init: chunk_bytes")
    if not 0 < n <= MAX_CHUNK_BYTES:
        raise UsageError(f"init: chunk_bytes={n} is out of range: 1..{MAX_CHUNK_BYTES}", "chunk_bytes")
    return n


def _env_float(name: str, default: float, limit: float = arguments.MAX_TIMEOUT) -> float:
    """A positive, finite number from the environment (at most ``limit``), or ``default``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number", name) from None
    if not 0 < value <= limit:  # (NaN fails too)
        raise UsageError(f"{name}={raw!r}: give a finite number above 0, at most {limit:g}", name)
    return value


class Runtime:
    """Everything one process needs to take part in collectives."""

    def __init__(self, rank: int | None, world_size: int, coordinator: str, token: str, *,
                 timeout: float | None = None, topology: str | Topology | None = None, host: str | None = None,
                 algorithm: str | None = None, chunk_bytes: int | None = None, auto_shrink: bool | None = None,
                 monitor_every: int | None = None, hostname: str | None = None):
        world_size = arguments.integer(world_size, "init: world_size")
        self.open = world_size == 0
        if self.open:
            if topology is not None:
                raise UsageError("an open job (world size 0) takes no topology: its ranks are drawn as processes join",
                                 "topology")
            if rank is not None:
                rank = arguments.rank(rank, arguments.MAX_RANK, "init: rank", "ranks of an open job")
        elif not 0 < world_size <= arguments.MAX_RANK:
            raise UsageError(f"init: world_size={world_size} is out of range: 1..{arguments.MAX_RANK} (0: an open job)",
                             "world_size")
        elif rank is None:
            raise UsageError(f"init: rank unknown in a world of {world_size}", "rank")
        else:
            rank = arguments.rank(rank, world_size, "init: rank", f"the ranks of a world of {world_size}")
        timeout = arguments.optional_timeout(timeout, "init: timeout")
        chunk_bytes = _chunk_bytes(chunk_bytes)
        if monitor_every is not None:
            monitor_every = arguments.integer(monitor_every, "init: monitor_every")
        for what, value in (("algorithm", algorithm), ("host", host), ("hostname", hostname)):
            if value is not None and not isinstance(value, str):
                raise UsageTypeError(f"init: {what} must be a string, got {type(value).__name__}", what)
        self.world_size = world_size
        local_settings.transport_choice()  # a misspelt COLLCOMM_TRANSPORT is refused before anything starts
        local_settings.half_bytes()       # ... and so is a bad COLLCOMM_SHM_BYTES
        # What this process registers as its host (the planner's and the object layer's box):
        # the machine's name, or an integration's (Ray's node id).
        self.hostname = hostname or os.environ.get("COLLCOMM_HOSTNAME") or socket.gethostname()
        self.timeout = timeout if timeout is not None else _env_float("COLLCOMM_TIMEOUT", DEFAULT_TIMEOUT)
        self.algorithm = algorithm or os.environ.get("COLLCOMM_ALGORITHM") or None
        self.chunk_bytes = chunk_bytes or max(1, int(_env_float("COLLCOMM_CHUNK_BYTES", DEFAULT_CHUNK_BYTES,
                                                                 MAX_CHUNK_BYTES)))
        # A size the user chose stays; the default one the link monitor may fit to the measured
        # link rates (collcomm.faults.chunks), group by group.
        self.chunk_fixed = bool(chunk_bytes) or bool(os.environ.get("COLLCOMM_CHUNK_BYTES", "").strip())
        self.auto_shrink = bool(auto_shrink) if auto_shrink is not None else \
            os.environ.get("COLLCOMM_AUTO_SHRINK", "").strip().lower() in ("1", "true", "yes", "on")
        self.monitor_every = int(monitor_every) if monitor_every is not None else \
            int(os.environ.get("COLLCOMM_MONITOR_EVERY") or 0)
        if self.monitor_every < 0:
            raise UsageError(f"monitor_every must be >= 0, got {self.monitor_every}", "monitor_every")
        listen = host or os.environ.get("COLLCOMM_HOST") or ("127.0.0.1" if coordinator.startswith(
            ("127.", "localhost")) else "0.0.0.0")
        advertise = None if listen not in ("0.0.0.0", "") else own_address(coordinator)
        self.listen_host, self.advertise_host = listen, advertise  # (the object server listens alike)
        self.objects = None  # the object layer, made on the first object call (collcomm.api)
        self.client = CoordinatorClient(coordinator, token, timeout=self.timeout)  # first: a bad TLS file opens nothing
        self.job_tag = shm_segment.job_tag(coordinator, token)  # names this job's shared-memory segments
        try:
            if self.open and rank is None:  # a fresh number from the job's counter
                rank = self.client.kv_add(OPEN_RANKS_KEY, 1, timeout=self.timeout) - 1
        except BaseException:
            self.client.close()
            raise
        self.rank = rank
        try:
            self.transport = TcpTransport(rank, token, host=listen, advertise_host=advertise,
                                          faults=inject.active_plan())
        except BaseException:
            self.client.close()
            raise
        try:
            # A new process for a rank that stands reported dead (the old one failed and the others
            # shrank): it takes the rank over and waits to be admitted by the survivors' grow().
            self.rejoining = not self.open and self._reported_dead(rank)
            table = self.client.register(rank, world_size, self.transport.address, hostname=self.hostname,
                                         timeout=self.timeout)
        except BaseException:
            self.transport.close()
            self.client.close()
            raise
        self.peer_addresses: dict[int, str] = {}
        self.hostnames: dict[int, str] = {}
        self._learn(table)
        source = topology if topology is not None else os.environ.get("COLLCOMM_TOPOLOGY") or None
        # "probe" (COLLCOMM_TOPOLOGY=probe, init(topology="probe")): collcomm.api.init measures the
        # fabric once the runtime is up and sets it (set_world_topology); a single rank has none.
        probe = isinstance(source, str) and source.strip().lower() == "probe"
        self.probe_at_init = probe and world_size > 1
        self._topology_source = None if probe else source
        self._world_topology: Topology | None = None
        # An open job has no world: its collectives run on groups (new_group).
        self.world = None if self.open else Group(self, WORLD_GROUP, "world", list(range(world_size)), table.epoch)
        self.groups: dict[int, Group] = {} if self.open else {WORLD_GROUP: self.world}
        self.p2p = MessageNumbers()
        self.closed = False

    def _learn(self, table) -> None:
        """Peers' addresses and hosts from a peer table (at init, and as an open job grows)."""
        addresses = {p.rank: p.address for p in table.peers}
        self.transport.set_peers(addresses)
        self.peer_addresses.update(addresses)
        self.hostnames.update({p.rank: p.hostname for p in table.peers})

    def know(self, ranks) -> None:
        """Make sure the addresses of ``ranks`` are known (an open job: ask who has joined since)."""
        unknown = [r for r in ranks if r not in self.peer_addresses]
        if unknown:
            self._learn(self.client.register(self.rank, self.world_size, self.transport.address,
                                             hostname=self.hostname, timeout=self.timeout))
            still = [r for r in unknown if r not in self.peer_addresses]
            if still:
                raise UsageError(f"rank(s) {still} have not joined this job", "ranks")

    def _reported_dead(self, rank: int) -> bool:
        try:
            status = self.client.group_status(WORLD_GROUP, timeout=min(self.timeout, 5.0))
        except CollectiveError:  # the world is not formed yet: a first start
            return False
        return any(d.rank == rank for d in status.dead)

    # ------------------------------------------------------------------ fabric
    def world_topology(self) -> Topology:
        if self.open:
            raise CollectiveError("an open job has no world fabric; each group plans on its members' hosts")
        if self._world_topology is None:
            src = self._topology_source
            if isinstance(src, Topology):
                topo = src
            elif src:
                topo = jsonio.load(src)
            else:
                topo = flat_topology([self.hostnames[r] for r in range(self.world_size)], f"flat{self.world_size}")
            if topo.num_ranks != self.world_size:
                raise ValueError(f"topology {topo.name!r} has {topo.num_ranks} ranks but the world has "
                                 f"{self.world_size}")
            self._world_topology = topo
        return self._world_topology

    @property
    def has_fabric(self) -> bool:
        """Whether the job plans on a given fabric (a topology file, a probed one) rather than the
        flat model of its hosts."""
        return not self.open and self._topology_source is not None

    def set_world_topology(self, topo: Topology) -> None:
        """The world's fabric from now on (a probed one); groups formed later plan on it."""
        self._topology_source = topo
        self._world_topology = None

    def set_hostname(self, rank: int, hostname: str) -> None:
        """``rank`` runs on ``hostname`` now (a restarted rank, see membership.grow)."""
        if self.hostnames[rank] != hostname:
            self.hostnames[rank] = hostname
            self._world_topology = None

    def group_topology(self, group: Group) -> Topology:
        if self.open:  # no world fabric: the members' hosts
            return flat_topology([self.hostnames[r] for r in group.members], f"flat/{group.name}")
        world = self.world_topology()
        try:
            return restrict(world, group.members, f"{world.name}/{group.name}")
        except CollectiveError:
            return flat_topology([self.hostnames[r] for r in group.members], f"flat/{group.name}")

    # ------------------------------------------------------------------ groups
    def new_group(self, ranks, name: str | None = None, timeout: float | None = None) -> Group:
        members = arguments.members(ranks, None if self.open else self.world_size, self.rank)
        name = arguments.group_name(name) or "group-" + "-".join(map(str, members))
        if len(name) > arguments.MAX_NAME:  # many members: a digest of them (the same on every member)
            name = "group-" + hashlib.sha256(name.encode()).hexdigest()[:32]
        timeout = arguments.timeout(timeout, self.timeout, "new_group: timeout")
        info = self.client.form_group(name, members, self.rank, timeout=timeout)
        if self.open:  # members that joined after this process did
            self.know(info.members)
        group = Group(self, info.group_id, name, list(info.members), info.epoch)
        self.groups[group.id] = group
        return group

    # ------------------------------------------------------------------ membership
    def shrink(self, group: Group | None = None, timeout: float | None = None) -> Group:
        """Re-form ``group`` (default: the world) without its failed members (see membership.shrink)."""
        return membership.shrink(self, group, timeout)

    def grow(self, group: Group | None = None, timeout: float | None = None) -> Group:
        """Re-admit restarted ranks into ``group`` (default: the world) (see membership.grow)."""
        return membership.grow(self, group, timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for g in self.groups.values():
            g.close()
        if self.objects is not None:
            self.objects.close()
        self.transport.close()
        self.client.close()


def own_address(coordinator: str) -> str:
    """The local address that reaches the coordinator (what peers on other machines can use)."""
    host, _, port = coordinator.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
