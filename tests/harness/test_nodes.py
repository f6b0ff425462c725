"""ringbench.harness.nodes: the node map's pure parts (layout problems, link classes, the record). The emulated
cluster runs them for real in tests/harness/test_multinode.py."""

from __future__ import annotations

import random

from ringbench.harness import nodes


def test_ranks_per_node_and_link_class():
    node_of = [0, 0, 1, 1, 1]
    assert nodes.ranks_per_node(node_of) == [2, 3]
    assert nodes.link_class(node_of, 0, 1) == "intra"
    assert nodes.link_class(node_of, 1, 2) == "inter"


def test_layout_problem():
    two = [0, 0, 1, 1]
    assert nodes.layout_problem("hybrid", 2, "node", two) is None
    assert nodes.layout_problem("hybrid", 1, "node", two) is None
    msg = nodes.layout_problem("hybrid", 4, "node", two)
    assert msg.startswith("--ulysses-degree: 4 is larger than a node (2/2 ranks per node)") and "--ulysses-groups any" in msg
    assert nodes.layout_problem("hybrid", 4, "any", two) is None
    assert nodes.layout_problem("ulysses", 4, "node", two) is None  # Ulysses over all ranks was asked for
    assert nodes.layout_problem("hybrid", 4, "node", [0] * 4) is None  # one node
    odd = [0, 0, 0, 1, 1, 1]
    assert "does not divide the ranks per node (3/3)" in nodes.layout_problem("hybrid", 2, "node", odd)
    assert "\n" not in msg


def _pairs_cross_brute(node_of, hops):
    return [list(h) for h in hops if node_of[h[0]] != node_of[h[1]]]


def test_links_random():
    rng = random.Random(5)
    for _ in range(50):
        rpn, k = rng.randint(1, 4), rng.randint(1, 4)
        p = rpn * k
        node_of = [i // rpn for i in range(p)]
        us = [u for u in range(1, p + 1) if p % u == 0]
        u = rng.choice(us)
        for mode in ("overlap", "allgather", "pass-q", "hybrid", "ulysses"):
            hops, pairs = nodes.links(mode, u, p)
            if p == 1:
                assert hops == pairs == []
                continue
            if mode == "ulysses":
                assert hops == [] and len(pairs) == p * (p - 1) // 2
            elif mode == "hybrid":
                r = p // u
                assert len(hops) == (0 if r == 1 else p) and len(pairs) == r * u * (u - 1) // 2
                assert all(a // u == b // u for a, b in pairs)
                assert all(a % u == b % u for a, b in hops)
                if u == rpn:  # node-local groups: no all-to-all pair crosses, every ring hop does (k > 1)
                    assert _pairs_cross_brute(node_of, pairs) == []
                    assert len(_pairs_cross_brute(node_of, hops)) == len(hops)
            else:
                assert hops == [(i, (i + 1) % p) for i in range(p)]
                assert len(_pairs_cross_brute(node_of, hops)) == (k if k > 1 else 0)  # node-major: k crossings


def test_node_record_and_bytes():
    node_of = [0, 0, 1, 1]
    world = [0, 2, 1, 3]  # cyclic placement renumbered node-major
    # position i sends 10 to the next position's WORLD rank
    sent = {"fwd": [{world[(i + 1) % 4]: 10} for i in range(4)]}
    rec = nodes.node_record(node_of, ["a", "b"], world, "overlap", 1, sent)
    assert rec["count"] == 2 and rec["ranks_per_node"] == [2, 2] and rec["hosts"] == ["a", "b"]
    assert rec["ring_hops_inter"] == [[1, 2], [3, 0]]
    assert rec["bytes_per_rank"]["fwd"] == {"intra": [10, 0, 10, 0], "inter": [0, 10, 0, 10]}
    line = nodes.format_nodes(rec)
    assert "nodes 2 (ranks a: 2, b: 2)" in line and "ring hops across nodes 2 of 4" in line
    assert nodes.format_nodes({"count": 1}) is None and nodes.format_nodes(None) is None
