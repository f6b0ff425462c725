"""What the MPI test workers of this folder share (they run as scripts under mpiexec: this folder is on their path)."""

from ringbench.engine import comm


def setup():
    """(the world communicator, this rank, the rank count, the NumPy backend) of a worker."""
    from ringbench.engine.backend import get_backend

    return comm.WORLD, comm.WORLD.rank, comm.WORLD.size, get_backend("numpy")


def report_checked(world, n_checked: int) -> int:
    """Rank 0 prints ``checked K`` (the fewest cases any rank checked); every rank returns 0."""
    counts = world.gather(n_checked)
    if world.rank == 0:
        print(f"checked {min(counts)}")
    return 0


def run(main) -> int:
    """``main()``'s status; a failure on any rank ends the whole job, never a hang."""
    return comm.run_or_abort(main)
