"""One model over several hosts: multi-controller SPMD on `jax.distributed`, one process per host.

Every process joins one JAX job (`join`), so `jax.devices()` lists every host's devices and the tensor-
parallel mesh spans them; each process loads only its own shards (`model.loader`). XLA then needs every
process to dispatch the same programs, with the same inputs, in the same order. Rank 0 (the leader) runs
HTTP, the tokenizer and the scheduler; before each step it sends the other ranks (followers) that step's
plan, and they replay it into the same `ModelRunner.run`. The sampled tokens are replicated across the
mesh, so rank 0 reads them from its own devices: nothing comes back over the side channel.

The channel is a plain TCP connection from each follower to the leader (the coordinator's port + 1),
carrying length-prefixed frames. Why not `multihost_utils.broadcast_one_to_all`: that is a device
collective per step, which costs a step's latency and cannot tell a dead follower from a slow one; a
socket costs microseconds and its end is news. A frame holds a versioned header (magic, version,
sequence number, CRC-32, length) and a `marshal` payload of plain tuples (slot ids, token ids, pages,
sampling options): no pickled objects, so a follower builds nothing from the wire but numbers and strings.

Failure: both ends send a heartbeat when they have said nothing for a while, and each read waits at most
`dist_timeout` seconds. A follower that loses the leader (end of stream, silence, a bad frame) exits
non-zero; a leader that loses a follower fails the engine (probes turn 503) and then its process exits
non-zero, so Kubernetes restarts the whole group. A process blocked in a collective with a dead peer never
returns, so these exits are `os._exit`, not exceptions.
"""

from __future__ import annotations

import logging
import marshal
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from serving.engine.scheduler import Chunk
from serving.request import EngineRequest, GenerationConfig
from serving.sampling_options import declared_options

logger = logging.getLogger(__name__)

PLAN_VERSION = 3
_MAGIC = b"XLSP"
_HEADER = struct.Struct("!4sHQII")  # magic, version, sequence number, CRC-32 of the payload, payload length
MAX_PAYLOAD = 64 << 20  # a step plan is kilobytes; anything near this is a corrupt length
# How often a silent end sends a heartbeat, as a fraction of the timeout: several beats fit in one timeout.
HEARTBEAT_FRACTION = 0.2
# A follower connecting before the leader listens retries every RETRY_INTERVAL_S, up to its init timeout.
RETRY_INTERVAL_S = 0.5
EXIT_GRACE_S = 1.0  # after a lost peer: long enough for probes to see 503 before the process exits
EXIT_LOST_PEER = 3  # the exit status of a process whose peer was lost
EXIT_NOT_JOINED = 1  # the exit status of a process whose group never assembled
JAX_DEADLINE_MARGIN_S = 5  # JAX's own join deadline comes this much after ours (see `join`)

# Message kinds
STEP, BEAT, STOP, HELLO = "step", "beat", "stop", "hello"


class PlanError(RuntimeError):
    """A frame that is not the next valid step plan: corrupt, out of order, or of another version."""


class PeerLost(RuntimeError):
    """The other end of the plan channel closed, went silent, or sent a bad frame."""


@dataclass(frozen=True)
class Group:
    """Where this process stands in its group of hosts."""

    nnodes: int
    node_rank: int
    coordinator: str  # HOST:PORT of rank 0's JAX coordinator; the plan channel is PORT + 1
    timeout: float  # seconds of silence after which a peer is lost
    init_timeout: float  # seconds to wait for every process to join

    @property
    def is_leader(self) -> bool:
        return self.node_rank == 0

    @property
    def plan_address(self) -> tuple[str, int]:
        host, port = split_address(self.coordinator)
        return host, port + 1


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--dist-init-addr must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# LeaderWorkerSet's variables (one group per model replica), then JAX's own, then a default port.
DEFAULT_DIST_PORT = 29500


def resolve_group(nnodes: int | None, node_rank: int | None, dist_init_addr: str | None, timeout: float,
                  init_timeout: float, environ: Mapping[str, str] = os.environ) -> Group | None:
    """The group from the flags, each unset one taken from LeaderWorkerSet's environment (`LWS_GROUP_SIZE`,
    `LWS_WORKER_INDEX`, `LWS_LEADER_ADDRESS`) or JAX's (`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
    `JAX_COORDINATOR_ADDRESS`); None for a single host."""
    if nnodes is None:
        nnodes = int(environ.get("LWS_GROUP_SIZE") or environ.get("JAX_NUM_PROCESSES") or 1)
    if nnodes <= 1:
        return None
    if node_rank is None:
        node_rank = int(environ.get("LWS_WORKER_INDEX") or environ.get("JAX_PROCESS_ID") or 0)
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in [0, {nnodes}), got {node_rank}")
    if dist_init_addr is None:
        if environ.get("JAX_COORDINATOR_ADDRESS"):
            dist_init_addr = environ["JAX_COORDINATOR_ADDRESS"]
        elif environ.get("LWS_LEADER_ADDRESS"):
            dist_init_addr = f"{environ['LWS_LEADER_ADDRESS']}:{DEFAULT_DIST_PORT}"
        else:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (or LWS_LEADER_ADDRESS)")
    split_address(dist_init_addr)
    if timeout <= 0 or init_timeout <= 0:
        raise ValueError("--dist-timeout and --dist-init-timeout must be positive")
    return Group(nnodes, node_rank, dist_init_addr, timeout, init_timeout)


def join(group: Group) -> None:
    """Join the JAX job of `group`: returns once every process has joined, raises after `init_timeout`.

    Call before anything else touches JAX. JAX's own heartbeat is set to the group's timeout, so a peer
    that dies is noticed by the coordination service within the same bound as by the plan channel.
    """
    import jax

    logger.warning("rank %d of %d: waiting up to %.0fs for the JAX coordinator at %s and every peer",
                   group.node_rank, group.nnodes, group.init_timeout, group.coordinator)
    why = (f"rank {group.node_rank} of {group.nnodes} could not join the group at {group.coordinator} within "
           f"{group.init_timeout:.0f}s (is every rank started, with the same --nnodes and --dist-init-addr?)")
    # When its deadline passes, JAX's client aborts the process from C++ with a stack trace (it does not
    # raise), so this process gives up a little earlier, by itself, with a message that says what is wrong.
    joined = threading.Event()
    threading.Thread(target=_give_up_unless, args=(joined, group.init_timeout, why), name="xlserve-join",
                     daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=group.coordinator, num_processes=group.nnodes, process_id=group.node_rank,
            initialization_timeout=round(group.init_timeout + JAX_DEADLINE_MARGIN_S),
            heartbeat_timeout_seconds=max(1, round(group.timeout)),
            shutdown_timeout_seconds=max(1, round(group.timeout)),
        )
    except Exception as error:  # JAX raises XlaRuntimeError for a bad address and the like
        raise RuntimeError(f"{why}: {error}") from error
    finally:
        joined.set()
    logger.warning("rank %d joined: %d processes, %d devices", group.node_rank, jax.process_count(),
                   jax.device_count())


def _give_up_unless(joined: threading.Event, timeout: float, why: str) -> None:
    if not joined.wait(timeout):
        print(f"xlserve: error: {why}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_NOT_JOINED)


# ----- the wire format -------------------------------------------------------------------------------------


_OPTIONS = tuple(d.name for d in declared_options(GenerationConfig))


def _sampling(request: EngineRequest) -> tuple:
    """What the runner reads of a request (`sampling.SamplingTable.write`), as plain values."""
    config = request.config
    return (config.do_sample, tuple(getattr(config, name) for name in _OPTIONS), request.seed,
            tuple(sorted(request.stop_token_ids)), tuple((config.logit_bias or {}).items()),
            tuple(config.bad_token_ids or ()), len(request.prompt_token_ids))


def encode_step(seq: int, chunks: list[Chunk], rows: int, tokens: int, packed: int | None, decode: int = 0) -> bytes:
    """The frame of one runner step: its shape and what `ModelRunner.run` needs of each chunk, as plain values."""
    plan = (rows, tokens, packed, decode, [
        (c.request.request_id, _sampling(c.request), c.slot, c.admission, c.start, c.length, c.token_ids,
         c.pages, c.step, c.samples, c.first, c.target) for c in chunks])
    return encode_frame(seq, (STEP, plan))


def encode_frame(seq: int, message: tuple) -> bytes:
    payload = marshal.dumps(message)
    return _HEADER.pack(_MAGIC, PLAN_VERSION, seq, zlib.crc32(payload), len(payload)) + payload


def decode_header(header: bytes, expected_seq: int) -> tuple[int, int]:
    """(CRC, payload length) of a frame header, checked against the version and the expected sequence."""
    magic, version, seq, crc, length = _HEADER.unpack(header)
    if magic != _MAGIC:
        raise PlanError(f"not a step plan frame (magic {magic!r})")
    if version != PLAN_VERSION:
        raise PlanError(f"step plan version {version}, this process speaks {PLAN_VERSION}: run one xlserve "
                        "version on every host")
    if seq != expected_seq:
        raise PlanError(f"step plan {seq} arrived when {expected_seq} was due")
    if length > MAX_PAYLOAD:
        raise PlanError(f"step plan of {length} bytes")
    return crc, length


def decode_payload(payload: bytes, crc: int) -> tuple:
    if zlib.crc32(payload) != crc:
        raise PlanError("step plan checksum mismatch")
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as error:
        raise PlanError(f"unreadable step plan: {error}") from error


def decode_frame(frame: bytes, expected_seq: int) -> tuple:
    """A whole frame back to its message; raises PlanError for anything but the next valid frame."""
    crc, length = decode_header(frame[:_HEADER.size], expected_seq)
    if len(frame) != _HEADER.size + length:
        raise PlanError(f"step plan of {len(frame) - _HEADER.size} bytes, its header says {length}")
    return decode_payload(frame[_HEADER.size:], crc)


class StepReplay:
    """Turns step plans back into `Chunk`s. One request object per slot occupant, kept while it holds the
    slot, so the runner's per-slot tables see the same owner from step to step (as on the leader)."""

    def __init__(self) -> None:
        self._by_slot: dict[int, tuple[str, tuple, EngineRequest]] = {}

    def chunks(self, plan_chunks: list[tuple]) -> list[Chunk]:
        out = []
        for (request_id, sampling, slot, admission, start, length, token_ids, pages, step, samples, first,
             target) in plan_chunks:
            held = self._by_slot.get(slot)
            if held is None or held[0] != request_id or held[1] != sampling:
                held = (request_id, sampling, _request(request_id, sampling))
                self._by_slot[slot] = held
            out.append(Chunk(held[2], slot, admission, start, length, list(token_ids), list(pages), step, samples,
                             first, target))
        return out


def _request(request_id: str, sampling: tuple) -> EngineRequest:
    do_sample, options, seed, stop_ids, logit_bias, bad_token_ids, prompt_len = sampling
    config = GenerationConfig(do_sample=do_sample, **dict(zip(_OPTIONS, options, strict=True)),
                              logit_bias=dict(logit_bias) or None, bad_token_ids=list(bad_token_ids) or None)
    # The runner reads only the prompt's length (where generated tokens start, for penalties).
    return EngineRequest(request_id, [0] * prompt_len, config, frozenset(stop_ids), seed)


# ----- the channel -----------------------------------------------------------------------------------------


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            part = sock.recv(size - len(data))
        except TimeoutError as error:
            raise PeerLost("silent for longer than the timeout") from error
        except OSError as error:
            raise PeerLost(f"connection failed: {error}") from error
        if not part:
            raise PeerLost("connection closed")
        data += part
    return bytes(data)


class _Link:
    """One end of a plan connection: numbered frames out under a lock, heartbeats when idle."""

    def __init__(self, sock: socket.socket, timeout: float):
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._lock = threading.Lock()
        self._sent = 0
        self._received = 0
        self._last_send = time.monotonic()

    def send(self, message: tuple) -> None:
        self.send_frame(lambda seq: encode_frame(seq, message))

    def send_frame(self, make: Callable[[int], bytes]) -> None:
        with self._lock:
            try:
                self.sock.sendall(make(self._sent))
            except OSError as error:
                raise PeerLost(f"send failed: {error}") from error
            self._sent += 1
            self._last_send = time.monotonic()

    def receive(self) -> tuple:
        crc, length = decode_header(_read_exactly(self.sock, _HEADER.size), self._received)
        message = decode_payload(_read_exactly(self.sock, length), crc)
        self._received += 1
        return message

    def beat_when_idle(self, interval: float) -> None:
        if time.monotonic() - self._last_send >= interval:
            self.send((BEAT, None))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def exit_after_grace(why: str) -> None:
    """End this process non-zero once probes have had a moment to see it failed (see the module docstring)."""
    logger.error("%s; exiting with status %d", why, EXIT_LOST_PEER)

    def end() -> None:
        time.sleep(EXIT_GRACE_S)
        logging.shutdown()
        os._exit(EXIT_LOST_PEER)

    threading.Thread(target=end, name="xlserve-exit", daemon=True).start()


class PlanBroadcaster:
    """The leader's end: every follower's connection, a step plan to each before every runner step."""

    def __init__(self, group: Group):
        self.group = group
        host, port = group.plan_address
        self._server = socket.create_server(("", port), reuse_port=False)
        self._links: dict[int, _Link] = {}
        self._closing = threading.Event()
        self.on_lost: Callable[[str], None] = exit_after_grace

    def accept(self) -> None:
        """Wait (up to the init timeout) for every follower to connect and say its rank."""
        deadline = time.monotonic() + self.group.init_timeout
        wanted = set(range(1, self.group.nnodes))
        while wanted - self._links.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(wanted - self._links.keys())
                raise RuntimeError(f"followers {missing} did not connect to the plan channel on port "
                                   f"{self.group.plan_address[1]} within {self.group.init_timeout:.0f}s")
            self._server.settimeout(left)
            try:
                sock, address = self._server.accept()
            except TimeoutError:
                continue
            link = _Link(sock, self.group.timeout)
            try:
                kind, rank = link.receive()
            except (PeerLost, PlanError, ValueError) as error:
                logger.warning("a connection from %s was not a follower: %s", address, error)
                link.close()
                continue
            if kind != HELLO or rank not in wanted or rank in self._links:
                logger.warning("refused a plan connection from %s (said %r %r)", address, kind, rank)
                link.close()
                continue
            self._links[rank] = link
            logger.warning("follower %d connected from %s", rank, address[0])
        self._server.close()
        for rank, link in self._links.items():
            threading.Thread(target=self._watch, args=(rank, link), name=f"xlserve-follower-{rank}",
                             daemon=True).start()
        threading.Thread(target=self._beat, name="xlserve-plan-beat", daemon=True).start()

    def send_step(self, chunks: list[Chunk], rows: int, tokens: int, packed: int | None, decode: int = 0) -> None:
        for rank, link in self._links.items():
            try:
                link.send_frame(lambda seq: encode_step(seq, chunks, rows, tokens, packed, decode))
            except PeerLost as error:
                self._lost(rank, error)
                raise

    def close(self) -> None:
        """Tell every follower to stop (a clean end, exit status 0)."""
        self._closing.set()
        for link in self._links.values():
            try:
                link.send((STOP, None))
            except PeerLost:
                pass
            link.close()

    def _watch(self, rank: int, link: _Link) -> None:
        """Followers only send heartbeats: anything else, or nothing for the timeout, loses the follower."""
        try:
            while True:
                kind, _ = link.receive()
                if kind != BEAT:
                    raise PlanError(f"follower {rank} sent {kind!r}")
        except (PeerLost, PlanError) as error:
            self._lost(rank, error)

    def _beat(self) -> None:
        interval = self.group.timeout * HEARTBEAT_FRACTION
        while not self._closing.wait(interval):
            for rank, link in list(self._links.items()):
                try:
                    link.beat_when_idle(interval)
                except PeerLost as error:
                    self._lost(rank, error)
                    return

    def _lost(self, rank: int, error: Exception) -> None:
        if not self._closing.is_set():
            self._closing.set()
            self.on_lost(f"lost follower {rank}: {error}")


def connect_to_leader(group: Group) -> _Link:
    """The follower's end: connect to the leader's plan channel, retrying (counted, bounded) until it listens."""
    host, port = group.plan_address
    attempts = max(1, int(group.init_timeout / RETRY_INTERVAL_S))
    for attempt in range(1, attempts + 1):
        try:
            sock = socket.create_connection((host, port), timeout=group.timeout)
        except OSError as error:
            if attempt == attempts:
                raise RuntimeError(f"rank {group.node_rank}: the leader's plan channel at {host}:{port} did not "
                                   f"answer after {attempts} attempts ({group.init_timeout:.0f}s): {error}") from error
            if attempt == 1 or attempt % 20 == 0:
                logger.warning("rank %d: waiting for the leader's plan channel at %s:%d (attempt %d of %d)",
                               group.node_rank, host, port, attempt, attempts)
            time.sleep(RETRY_INTERVAL_S)
            continue
        link = _Link(sock, group.timeout)
        link.send((HELLO, group.node_rank))
        return link
    raise AssertionError("unreachable")


def follow(link: _Link, run: Callable[[list[Chunk], int, int, int | None, int], None], timeout: float) -> None:
    """Replay the leader's steps through `run` until it says stop; raises PeerLost or PlanError otherwise.

    A heartbeat thread keeps the leader informed that this follower lives while it waits or computes.
    """
    replay = StepReplay()
    stopped = threading.Event()

    def beat() -> None:
        interval = timeout * HEARTBEAT_FRACTION
        while not stopped.wait(interval):
            try:
                link.beat_when_idle(interval)
            except PeerLost:
                return  # the read below finds out too

    threading.Thread(target=beat, name="xlserve-plan-beat", daemon=True).start()
    try:
        while True:
            kind, plan = link.receive()
            if kind == STOP:
                return
            if kind == STEP:
                *shape, plan_chunks = plan
                run(replay.chunks(plan_chunks), *shape)
            elif kind != BEAT:
                raise PlanError(f"unknown step plan message {kind!r}")
    finally:
        stopped.set()
