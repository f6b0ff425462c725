"""The only module that touches MPI: ring neighbours, the K/V exchange, collectives, abort.

Ring direction: rank r sends to r+1 and receives from r-1 (mod P). Every buffer goes to MPI as raw
bytes, so any dtype (float16, bfloat16) travels unchanged.

Device buffers (CuPy): the current stream is synchronised before a buffer is handed to MPI. With a
CUDA-aware MPI the device pointer goes to MPI directly; otherwise the data is staged through pinned
host buffers (device -> host before the send, host -> device after the receive completes).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time
import traceback

from mpi4py import MPI

WORLD = MPI.COMM_WORLD
ABORT_GRACE_S = 0.5


class ProtocolError(RuntimeError):
    """post/wait called out of order: the overlap loop must alternate post, compute, wait."""


def _buf(x):
    return [x, MPI.BYTE]


def detect_cuda_aware() -> bool:
    """Best-effort query of the MPI library for CUDA support (Open MPI and MPICH extensions, Cray env)."""
    if os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        return True
    try:
        lib = ctypes.CDLL(None)
    except OSError:  # pragma: no cover
        return False
    fn = getattr(lib, "MPIX_Query_cuda_support", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        return bool(fn())
    fn = getattr(lib, "MPIX_GPU_query_support", None)  # MPICH >= 4: (MPIX_GPU_SUPPORT_CUDA = 0, int*)
    if fn is not None:
        flag = ctypes.c_int(0)
        try:
            if fn(ctypes.c_int(0), ctypes.byref(flag)) == 0:
                return bool(flag.value)
        except Exception:  # pragma: no cover
            return False
    return False


class KVExchange:
    """Double-buffered nonblocking exchange of blocks with the ring neighbours.

    ``post(send, recv)`` starts Isend(send -> next) and Irecv(recv <- prev); ``post_all(pairs)`` does the same
    for several (send, recv) pairs at once (the backward moves a K/V block and a dK/dV accumulator together;
    pair i has its own tag, so each receive matches its own send); ``wait()`` completes them all. Posting
    twice, or waiting with nothing posted, raises ProtocolError: the overlap must be post -> compute -> wait,
    visibly.
    """

    def __init__(self, comm, backend, cuda_aware: bool, name: str = ""):
        self.comm = comm
        self.backend = backend
        self.staged = backend.is_gpu and not cuda_aware
        self.name = name  # prefix of its pinned staging buffers: exchanges of other shapes keep their own
        self.next = (comm.rank + 1) % comm.size
        self.prev = (comm.rank - 1) % comm.size
        self._reqs: list = []
        self._staged_recvs: list = []  # (device buffer, pinned host buffer) to copy in after the wait
        self.log: list | None = None  # where the ring keeps this step's marks (post and wait times): see :meth:`mark`

    def mark(self, kind: str, *times: float) -> None:
        """Note a post (``"post"``, its time and the bytes it sends) or a wait (``"wait"``, its start and end: time.perf_counter) in
        ``log``, if the ring gave one: the k-th post of a step and its k-th wait belong to the same transfer, on every rank
        (what ringbench.analysis.measure.split_exposed matches against the neighbours' posts)."""
        if self.log is not None:
            self.log.append((kind, *times))

    @property
    def posted(self) -> bool:
        return bool(self._reqs)

    def twin(self, name: str) -> KVExchange:
        """Another exchange between the same neighbours, with its own requests and staging buffers: two transfers in
        flight at once, each posted and waited for on its own (the backward's dK/dV slices on their way home)."""
        return KVExchange(self.comm, self.backend, not self.staged, name=name)

    def post(self, send, recv, tag: int = 0) -> None:
        self.post_all([(send, recv)], tag)

    def post_all(self, pairs, tag: int = 0, *, dest: int | None = None, source: int | None = None) -> None:
        """Start every (send, recv) pair of ``pairs``; pair i travels with tag ``tag + 2 i``, to ``dest`` and from
        ``source`` (default: the next and the previous rank on the ring)."""
        if self._reqs:
            raise ProtocolError("post() called twice without wait()")
        if not pairs:
            raise ProtocolError("post() called with nothing to send")
        self.backend.synchronize()  # the device buffers must be complete before MPI reads them
        dest = self.next if dest is None else dest
        source = self.prev if source is None else source
        reqs = []
        for i, (send, recv) in enumerate(pairs):
            if self.staged:
                suffix = str(i) if i else ""
                send_h = self.backend.pinned_empty(self.name + "send" + suffix, send.shape, send.dtype)
                recv_h = self.backend.pinned_empty(self.name + "recv" + suffix, recv.shape, recv.dtype)
                send.get(out=send_h)
                self._staged_recvs.append((recv, recv_h))
                send, recv = send_h, recv_h
            if TRAFFIC.on:
                TRAFFIC.add(self.comm, dest, send.nbytes)
            t = tag + 2 * i
            reqs += [self.comm.Irecv(_buf(recv), source=source, tag=t), self.comm.Isend(_buf(send), dest=dest, tag=t)]
        self._reqs = reqs
        self.mark("post", time.perf_counter(), float(sum(send.nbytes for send, _ in pairs)))

    def test(self) -> bool:
        """Drive MPI progress (no-op once complete); True when every posted transfer is done."""
        return bool(self._reqs) and MPI.Request.Testall(self._reqs)

    def wait(self) -> None:
        if not self._reqs:
            raise ProtocolError("wait() called with nothing posted")
        t0 = time.perf_counter()
        MPI.Request.Waitall(self._reqs)
        self.mark("wait", t0, time.perf_counter())
        self._reqs = []
        for dev, host in self._staged_recvs:
            dev.set(host)
        self._staged_recvs = []

    def sendrecv(self, send, recv, tag: int = 1) -> None:
        """Blocking exchange (the no-overlap baseline)."""
        self.sendrecv_all([(send, recv)], tag)

    def sendrecv_all(self, pairs, tag: int = 1) -> None:
        """Blocking exchange of every (send, recv) pair: post them all, wait for them all."""
        self.post_all(pairs, tag)
        self.wait()

    def allgather(self, local, out) -> None:
        """Every rank's ``local`` block into ``out`` (P, *local.shape), rank order."""
        t0 = time.perf_counter()
        self.mark("post", t0, float(local.nbytes))
        _collective(self.comm, "Allgather", self.backend, self.staged, local, out, "ag")
        self.mark("wait", t0, time.perf_counter())

    def alltoall(self, send, recv) -> None:
        """Block j of ``send`` (P, ...) to rank j; ``recv[i]`` (P, ...) receives rank i's block for this rank.

        The allgather backward's reduce-scatter of dK/dV: each owner then sums what it received itself, in ring
        order, so the sum is the ring's bit for bit (MPI_Reduce_scatter_block's summation order is the library's).
        """
        t0 = time.perf_counter()
        self.mark("post", t0, float(send.nbytes))
        _collective(self.comm, "Alltoall", self.backend, self.staged, send, recv, "a2a")
        self.mark("wait", t0, time.perf_counter())


def clock_offset(comm=WORLD, rounds: int = 8) -> float:
    """Collective: this rank's time.perf_counter minus rank 0's at the same moment, in seconds (0 on rank 0), from
    ``rounds`` round trips with rank 0, the shortest kept (its midpoint: error at most half that round trip). On one
    host the monotonic clock is shared and this is ~0; across hosts it puts every rank's marks on rank 0's clock."""
    offset = 0.0
    for r in range(1, comm.size):
        best = None
        for _ in range(rounds):
            if comm.rank == 0:
                t0 = time.perf_counter()
                comm.send(None, dest=r, tag=11)
                tr = comm.recv(source=r, tag=12)
                t1 = time.perf_counter()
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, tr - (t0 + t1) / 2)
            elif comm.rank == r:
                comm.recv(source=0, tag=11)
                comm.send(time.perf_counter(), dest=0, tag=12)
        if comm.rank == 0:
            comm.send(best[1], dest=r, tag=13)
        elif comm.rank == r:
            offset = comm.recv(source=0, tag=13)
    return offset


def _collective(comm, kind: str, backend, staged: bool, send, recv, key: str, root: int = 0) -> None:
    """The MPI collective ``kind`` (Allgather, Alltoall, or Gather to ``root``) of whole buffers over ``comm``, on
    device buffers directly, or staged through pinned host buffers named ``key`` when MPI is not CUDA-aware. The
    stream is synchronised first: MPI reads ``send``. While TRAFFIC counts, the bytes go to each destination."""
    if TRAFFIC.on:
        if kind == "Gather":  # all of send to the root
            TRAFFIC.add(comm, root, send.nbytes)
        else:  # Allgather: all of send to every other member; Alltoall: block j of send to member j
            each = send.nbytes if kind == "Allgather" else send.nbytes // max(comm.size, 1)
            for j in range(comm.size):
                TRAFFIC.add(comm, j, each)
    if kind == "Gather":

        def op(s, r):
            comm.Gather(s, r, root=root)
    else:
        op = getattr(comm, kind)
    backend.synchronize()
    if not staged:
        op(_buf(send), _buf(recv))
        return
    send_h = backend.pinned_empty(key + "_send", send.shape, send.dtype)
    recv_h = backend.pinned_empty(key + "_recv", recv.shape, recv.dtype)
    send.get(out=send_h)
    op(_buf(send_h), _buf(recv_h))
    recv.set(recv_h)


# ---------------------------------------------------------------------------------------------
# Small collectives used by the run driver
# ---------------------------------------------------------------------------------------------
def barrier(comm=WORLD) -> None:
    comm.Barrier()


def gather(obj, comm=WORLD, root: int = 0):
    return comm.gather(obj, root=root)


def bcast(obj, comm=WORLD, root: int = 0):
    return comm.bcast(obj, root=root)


def allreduce_sum(x, comm=WORLD) -> None:
    """Sum a host array over the ranks, in place, on every rank."""
    comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)


_NODE = {}


def node_comm(comm=WORLD):
    """The ranks of ``comm`` that share this rank's node (memory), as a communicator; collective the first time."""
    key = comm.py2f()
    if key not in _NODE:
        _NODE[key] = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    return _NODE[key]


def node_map(comm=WORLD) -> tuple[list[int], list[str]]:
    """Collective over ``comm``: (the node index of every rank of ``comm``, the host name of every node), from MPI's
    shared-memory split (the ranks that share memory are one node), never from rank arithmetic. Nodes are numbered
    in the order of their lowest rank; a node's name is its lowest rank's host name."""
    node = node_comm(comm)
    leader = node.allgather(comm.rank)[0]  # the node's lowest rank of ``comm``
    facts = comm.allgather((leader, socket.gethostname()))
    leaders = sorted({lead for lead, _ in facts})
    index = {lead: i for i, lead in enumerate(leaders)}
    return [index[lead] for lead, _ in facts], [facts[lead][1] for lead in leaders]


_MAJOR = {}


def node_major(comm=WORLD):
    """``comm``'s ranks renumbered node-major: the ranks of node 0 (in ``comm`` order), then node 1's, ... (nodes as
    :func:`node_map` numbers them), as a communicator; collective the first time. It is ``comm``'s own order when
    every node holds consecutive ranks (one node, block placement)."""
    key = comm.py2f()
    if key not in _MAJOR:
        nodes, _ = node_map(comm)
        order = sorted(range(comm.size), key=lambda r: (nodes[r], r))
        _MAJOR[key] = comm.Split(color=0, key=order.index(comm.rank))
    return _MAJOR[key]


class Traffic:
    """Bytes this rank addresses to each rank of WORLD while counting is on (``start`` .. ``stop``): the runner counts
    one pass of each phase, so that its bytes per rank split into the link classes of the node map. A send to this
    rank itself is not counted (it crosses no link)."""

    def __init__(self):
        self.on = False
        self.sent: dict[int, int] = {}
        self._world: dict = {}

    def start(self) -> None:
        self.on, self.sent = True, {}

    def stop(self) -> dict[int, int]:
        self.on = False
        return dict(self.sent)

    def add(self, c, dest: int, nbytes: int) -> None:
        key = (c.py2f(), dest)
        if key not in self._world:  # a local translation (no communication)
            self._world[key] = MPI.Group.Translate_ranks(c.Get_group(), [dest], WORLD.Get_group())[0]
        w = self._world[key]
        if w != WORLD.rank:
            self.sent[w] = self.sent.get(w, 0) + int(nbytes)


TRAFFIC = Traffic()


def node_allgather(obj, comm=WORLD) -> list:
    """Collective over ``comm``: ``obj`` of every rank on this rank's node, in rank order."""
    return node_comm(comm).allgather(obj)


def first_error(msg: str | None, comm=WORLD) -> str | None:
    """Collective: the first (lowest rank) non-None error message, on every rank."""
    for m in comm.allgather(msg):
        if m is not None:
            return m
    return None


def abort(code: int = 1, comm=WORLD) -> None:
    """End the whole job now (every rank), from whichever rank failed."""
    sys.stderr.flush()
    sys.stdout.flush()
    # give the launcher's I/O forwarding a moment: MPI_Abort kills the job, and output still in a pipe is lost
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def report_exception_and_abort(exc: BaseException, comm=WORLD) -> None:
    """Print this rank's traceback with its rank, then abort the job (never hang on a dead peer)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"ringbench: rank {comm.rank} of {comm.size} on {socket.gethostname()} failed:\n{tb}")
    abort(1, comm)


def run_or_abort(main, comm=WORLD) -> int:
    """``main()``'s exit status; an exception on this rank is reported and aborts the whole job (never a hang).
    For scripts run under mpiexec: ``sys.exit(comm.run_or_abort(main))``."""
    try:
        return main()
    except BaseException as exc:
        report_exception_and_abort(exc, comm)
        return 1  # not reached: abort ends the process


# ---------------------------------------------------------------------------------------------
# Ping-pong between two ranks (ringbench probe): link latency and bandwidth
# ---------------------------------------------------------------------------------------------
def pingpong(buf, peer: int, initiator: bool, iters: int, warmup: int = 2, comm=WORLD) -> list:
    """One-way times (round trip / 2, seconds) of ``buf`` bounced between this rank and ``peer``.

    Both ranks call it with the same buffer size and ``iters``; exactly one has ``initiator=True``
    (it sends first and returns the times; the other returns an empty list).
    """
    times = []
    b = _buf(buf)
    for i in range(warmup + iters):
        if initiator:
            t0 = MPI.Wtime()
            comm.Send(b, dest=peer, tag=7)
            comm.Recv(b, source=peer, tag=7)
            if i >= warmup:
                times.append((MPI.Wtime() - t0) / 2)
        else:
            comm.Recv(b, source=peer, tag=7)
            comm.Send(b, dest=peer, tag=7)
    return times


def timed_alltoall(c, send, recv, iters: int, warmup: int = 1) -> list:
    """Seconds of each of ``iters`` MPI_Alltoall calls of ``send`` (block j to rank j of ``c``) into ``recv``, each
    started together (a barrier of ``c`` first)."""
    times = []
    for i in range(warmup + iters):
        c.Barrier()
        t0 = MPI.Wtime()
        c.Alltoall(_buf(send), _buf(recv))
        if i >= warmup:
            times.append(MPI.Wtime() - t0)
    return times


def mpi_info() -> dict:
    return {
        "mpi_library": " ".join(MPI.Get_library_version().split("\n")[0].split()),
        "mpi_version": "{}.{}".format(*MPI.Get_version()),
        "mpi4py": __import__("mpi4py").__version__,
    }


# ---------------------------------------------------------------------------------------------
# Context-parallel strategies (ringbench.engine.strategies): sub-communicators, all-to-all, any-peer exchange
# ---------------------------------------------------------------------------------------------
def split_groups(comm, group_size: int):
    """(group, ring) sub-communicators of ``comm``: groups of ``group_size`` consecutive ranks, and the
    ring of the ranks with the same position in every group (rank r: group r // U, ring r % U)."""
    rank = comm.rank
    group = comm.Split(color=rank // group_size, key=rank)
    ring = comm.Split(color=rank % group_size, key=rank)
    return group, ring


class AllToAll:
    """MPI_Alltoall of equal blocks: ``send`` (P, ...) block j goes to rank j, ``recv`` (P, ...) block i came from rank i."""

    def __init__(self, comm, backend, cuda_aware: bool):
        self.comm = comm
        self.backend = backend
        self.staged = backend.is_gpu and not cuda_aware

    def __call__(self, send, recv) -> None:
        if self.comm.size == 1:
            self.backend.synchronize()
            recv[...] = send
            return
        _collective(self.comm, "Alltoall", self.backend, self.staged, send, recv, "a2a")


class PeerExchange(KVExchange):
    """Nonblocking send to any peer and receive from any peer (pass-Q returns partial outputs to their owners).

    :class:`KVExchange` with the peers named per post: ``post(send, dest, recv, source)`` then ``wait``; posting
    twice or waiting with nothing posted raises ProtocolError.
    """

    def __init__(self, comm, backend, cuda_aware: bool, name: str = "peer"):
        super().__init__(comm, backend, cuda_aware, name=name + "_")

    def post(self, send, dest: int, recv, source: int, tag: int = 3) -> None:
        self.post_all([(send, recv)], tag, dest=dest, source=source)


# ---------------------------------------------------------------------------------------------
# The decode merges' collectives (ringbench.engine.serving): typed, so MPI can reduce them
# ---------------------------------------------------------------------------------------------
_REDUCE_OPS = {"max": MPI.MAX, "sum": MPI.SUM}


def allreduce(x, op: str, comm, backend, staged: bool) -> None:
    """``x`` (a float32 or float64 array) in place: its elementwise ``op`` ('max' or 'sum') over the ranks of ``comm``,
    on every rank (the library's tree or recursive doubling: log P latency). Staged through a pinned host buffer
    when device buffers cannot go to MPI (``staged``)."""
    if TRAFFIC.on:  # counted as recursive doubling would send it: all of x to the partner of each of the log2 P rounds
        k = 1
        while k < comm.size:
            if comm.rank ^ k < comm.size:
                TRAFFIC.add(comm, comm.rank ^ k, x.nbytes)
            k <<= 1
    backend.synchronize()
    mop = _REDUCE_OPS[op]
    if not staged:
        comm.Allreduce(MPI.IN_PLACE, x, op=mop)
        return
    host = backend.pinned_empty(f"allreduce_{x.dtype}_{x.size}", x.shape, x.dtype)
    x.get(out=host)
    comm.Allreduce(MPI.IN_PLACE, host, op=mop)
    x.set(host)


def gather_to(local, out, comm, backend, staged: bool, root: int = 0) -> None:
    """Every rank's ``local`` into ``out`` (P, *local.shape) on ``root``, rank order (``out`` is not written elsewhere)."""
    _collective(comm, "Gather", backend, staged, local, out, "gather", root=root)
