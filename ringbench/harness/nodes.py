"""The node map of a run: which ranks share a node, which of a strategy's links cross nodes, bytes per link class.

Pure: no MPI (the map itself comes from MPI's shared-memory split, ringbench.engine.comm.node_map; the runner
orders the ranks node-major, comm.node_major). Ranks here are ring positions, the ranks of that node-major
communicator: ``node_of[i]`` is the node of position i.

* :func:`layout_problem` says why a hybrid run cannot have node-local groups (``--ulysses-groups node``);
* :func:`links` lists a strategy's ring hops and all-to-all pairs with their link class (intra | inter);
* :func:`node_record` is what a run stores under provenance ``nodes`` (docs/results.md).
"""

from __future__ import annotations

INTRA, INTER = "intra", "inter"


def ranks_per_node(node_of: list[int]) -> list[int]:
    """Ranks on each node, nodes in index order."""
    counts = [0] * (max(node_of) + 1 if node_of else 0)
    for n in node_of:
        counts[n] += 1
    return counts


def link_class(node_of: list[int], a: int, b: int) -> str:
    return INTRA if node_of[a] == node_of[b] else INTER


def layout_problem(mode: str, u: int, groups: str, node_of: list[int]) -> str | None:
    """One line naming the option and what the placement allows, when hybrid's groups of U consecutive (node-major)
    ranks would span nodes and ``--ulysses-groups node`` asked that they do not; None when it holds."""
    if mode != "hybrid" or groups != "node" or u <= 1:
        return None
    counts = ranks_per_node(node_of)
    if len(counts) <= 1:
        return None
    per = "/".join(str(c) for c in counts)
    if u > min(counts):
        return (
            f"--ulysses-degree: {u} is larger than a node ({per} ranks per node): with --ulysses-groups node each "
            f"all-to-all group must be the ranks of one node; use U <= {min(counts)} dividing the ranks per node, "
            "or --ulysses-groups any to let groups span nodes"
        )
    bad = [c for c in counts if c % u]
    if bad:
        return (
            f"--ulysses-degree: {u} does not divide the ranks per node ({per}): a group would span two nodes; use a U "
            "that divides every node's rank count, or --ulysses-groups any to let groups span nodes"
        )
    return None


def links(mode: str, u: int, nranks: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(ring hops (src, dst), all-to-all pairs (a, b) with a < b) of a strategy at ``nranks`` positions.

    Ring modes and pass-q: hop i -> i + 1 (mod P). Hybrid (group g = positions g U .. g U + U - 1): each group's
    pairs, and the ring over groups, member a of group g -> member a of group g + 1. Ulysses: one group, no ring.
    Allgather: the collective over every pair (its ring of the comm-only pass is the ring's)."""
    p = nranks
    if p <= 1:
        return [], []
    if mode in ("ulysses", "hybrid"):
        u = p if mode == "ulysses" else u
        r = p // u
        pairs = [(g * u + a, g * u + b) for g in range(r) for a in range(u) for b in range(a + 1, u)]
        hops = [] if r == 1 else [(g * u + a, ((g + 1) % r) * u + a) for g in range(r) for a in range(u)]
        return hops, pairs
    hops = [(i, (i + 1) % p) for i in range(p)]
    pairs = [(a, b) for a in range(p) for b in range(a + 1, p)] if mode == "allgather" else []
    return hops, pairs


def class_bytes(node_of: list[int], world_pos: dict[int, int], sent: list[dict]) -> dict[str, list[int]]:
    """{intra: [bytes per position], inter: [...]} from each position's bytes per destination WORLD rank
    (``sent[i]``; ``world_pos`` maps a WORLD rank to its position)."""
    out = {INTRA: [0] * len(sent), INTER: [0] * len(sent)}
    for i, per_dest in enumerate(sent):
        for dest, n in per_dest.items():
            out[link_class(node_of, i, world_pos[int(dest)])][i] += int(n)
    return out


def node_record(node_of: list[int], node_hosts: list[str], world_ranks: list[int], mode: str, u: int, sent: dict) -> dict:
    """What a run stores as provenance ``nodes``: the map, the crossing links, bytes per rank per link class.

    ``node_of[i]``, ``world_ranks[i]``: node and WORLD rank of position i; ``node_hosts[n]``: node n's host name;
    ``sent``: {phase: [position i's {WORLD rank: bytes} of one pass]}."""
    p = len(node_of)
    hops, pairs = links(mode, u, p)
    world_pos = {w: i for i, w in enumerate(world_ranks)}
    return {
        "count": len(node_hosts),
        "hosts": list(node_hosts),
        "ranks_per_node": ranks_per_node(node_of),
        "node_of_rank": list(node_of),
        "world_rank": list(world_ranks),
        "ring_hops": len(hops),
        "ring_hops_inter": [list(h) for h in hops if link_class(node_of, *h) == INTER],
        "a2a_pairs": len(pairs),
        "a2a_pairs_inter": [list(q) for q in pairs if link_class(node_of, *q) == INTER],
        "bytes_per_rank": {ph: class_bytes(node_of, world_pos, s) for ph, s in sent.items()},
    }


def format_nodes(rec: dict) -> str | None:
    """One summary line of a run's node map, or None on one node."""
    if not rec or rec.get("count", 1) <= 1:
        return None
    per = ", ".join(f"{h}: {c}" for h, c in zip(rec["hosts"], rec["ranks_per_node"]))
    parts = [f"nodes {rec['count']} (ranks {per})"]
    if rec["ring_hops"]:
        parts.append(f"ring hops across nodes {len(rec['ring_hops_inter'])} of {rec['ring_hops']}")
    if rec["a2a_pairs"]:
        parts.append(f"all-to-all pairs across nodes {len(rec['a2a_pairs_inter'])} of {rec['a2a_pairs']}")
    for ph, b in rec.get("bytes_per_rank", {}).items():
        parts.append(f"{ph} MiB/rank intra {max(b[INTRA]) / 2**20:.2f} inter {max(b[INTER]) / 2**20:.2f}")
    return "  " + "; ".join(parts)
