"""Neighbour selection (docs/reference.md, "Neighbours"), pure: every rule, the ring, the limit."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from probe.neighbours import (
    NodeInfo,
    PodInfo,
    eligible,
    known_eligible,
    ring_front,
    ring_hash,
    ring_order,
    select_neighbours,
)

RING = 1 << 64


def pod(name: str, node: str, *, phase: str = "Running", ip: str = "10.0.0.1", terminating: bool = False) -> PodInfo:
    return PodInfo(name, node, ip, "192.168.0.1", phase, terminating)


def nodes(*names: str, **overrides: NodeInfo) -> dict[str, NodeInfo]:
    result = {n: NodeInfo(n) for n in names}
    result.update(overrides)
    return result


def names(pods: list[PodInfo]) -> list[str]:
    return [p.name for p in pods]


# The hash -------------------------------------------------------------------------------


def test_ring_hash_is_the_first_eight_sha256_bytes_big_endian() -> None:
    # sha256("") = e3b0c44298fc1c14..., sha256("node-a") = 66570ff05a207404...
    assert ring_hash("") == 0xE3B0C44298FC1C14
    assert ring_hash("node-a") == 0x66570FF05A207404
    assert all(0 <= ring_hash(f"n{i}") < RING for i in range(100))


# Eligibility ----------------------------------------------------------------------------


def test_only_running_pods_are_eligible() -> None:
    pods = [pod(f"p-{phase}", "n1", phase=phase) for phase in ("Running", "Pending", "Succeeded", "Failed", "Unknown")]
    assert names(eligible(pods, nodes("n1"), own_pod="me", allow_unschedulable=False)) == ["p-Running"]


def test_terminating_pods_and_this_pod_are_not_eligible() -> None:
    pods = [pod("a", "n1"), pod("b", "n1", terminating=True), pod("me", "n1")]
    assert names(eligible(pods, nodes("n1"), own_pod="me", allow_unschedulable=False)) == ["a"]


def test_pods_without_an_ip_cannot_be_checked() -> None:
    pods = [pod("a", "n1"), pod("b", "n1", ip="")]
    assert names(eligible(pods, nodes("n1"), own_pod="me", allow_unschedulable=False)) == ["a"]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (NodeInfo("n2"), ["a", "b"]),
        (NodeInfo("n2", unschedulable=True), ["a"]),
        (NodeInfo("n2", unschedulable_taint=True), ["a"]),
        (NodeInfo("n2", unschedulable=True, unschedulable_taint=True), ["a"]),
        (None, ["a"]),  # the node is gone
    ],
)
def test_pods_on_unschedulable_tainted_or_missing_nodes_are_not_eligible(
    node: NodeInfo | None, expected: list[str]
) -> None:
    pods = [pod("a", "n1"), pod("b", "n2")]
    known = nodes("n1", **({"n2": node} if node else {}))
    assert names(eligible(pods, known, own_pod="me", allow_unschedulable=False)) == expected


def test_allow_unschedulable_ignores_node_state_but_not_the_pod_rules() -> None:
    pods = [pod("a", "cordoned"), pod("b", "gone"), pod("c", "n1", phase="Pending"), pod("me", "n1")]
    known = nodes("n1", cordoned=NodeInfo("cordoned", unschedulable=True, unschedulable_taint=True))
    assert names(eligible(pods, known, own_pod="me", allow_unschedulable=True)) == ["a", "b"]


def test_node_schedulable_property() -> None:
    assert NodeInfo("n").schedulable
    assert not NodeInfo("n", unschedulable=True).schedulable
    assert not NodeInfo("n", unschedulable_taint=True).schedulable


# The ring -------------------------------------------------------------------------------


def distance(own: str, other: str) -> int:
    return (ring_hash(other) - ring_hash(own)) % RING


def test_ring_order_is_the_distance_after_this_node_modulo_2_64() -> None:
    pods = [pod(f"p{i}", f"node-{i}") for i in range(50)]
    ordered = ring_order(pods, "node-7")
    distances = [distance("node-7", p.node_name) for p in ordered]
    assert distances == sorted(distances)
    # It wraps: the nodes just "before" this one on the ring come last, not first.
    before = [p for p in pods if ring_hash(p.node_name) < ring_hash("node-7")]
    after = [p for p in pods if ring_hash(p.node_name) >= ring_hash("node-7")]
    assert before and after
    assert set(names(ordered[: len(after)])) == set(names(after))


def test_ring_order_with_a_limit_takes_the_nearest_and_keeps_their_order() -> None:
    pods = [pod(f"p{i}", f"node-{i}") for i in range(50)]
    assert ring_order(pods, "node-3", 5) == ring_order(pods, "node-3")[:5]
    assert len(ring_order(pods, "node-3", 500)) == 50


def test_ring_order_ties_are_broken_by_pod_name_and_input_order_does_not_matter() -> None:
    pods = [pod("b", "node-1"), pod("a", "node-1"), pod("c", "node-2")]
    shuffled = pods[::-1]
    assert ring_order(pods, "node-0") == ring_order(shuffled, "node-0")
    same_node = [p for p in ring_order(pods, "node-0") if p.node_name == "node-1"]
    assert names(same_node) == ["a", "b"]


def test_pods_on_this_node_are_at_distance_zero() -> None:
    # (h(theirs) - h(mine)) mod 2^64 is 0 for this node: a second probe pod here comes first.
    pods = [pod("x", "node-9"), pod("here", "node-1")]
    assert names(ring_order(pods, "node-1", 1)) == ["here"]


def test_select_neighbours_returns_what_alive_shows() -> None:
    known = nodes("node-1", "node-2")
    chosen = select_neighbours(
        [pod("a", "node-1", ip="10.1.1.1"), pod("me", "node-2")], known, own_pod="me", own_node="node-2", limit=10
    )
    assert [n.as_alive() for n in chosen] == [
        {"PodName": "a", "PodIP": "10.1.1.1", "HostIP": "192.168.0.1", "NodeName": "node-1", "Phase": "Running"}
    ]


def test_selection_applies_the_rules_before_the_limit() -> None:
    # The nearest pod is on a cordoned node: the limit's worth comes from the eligible ones.
    pods = [pod(f"p{i}", f"node-{i}") for i in range(20)]
    nearest = ring_order(pods, "node-0")[0 if ring_order(pods, "node-0")[0].node_name != "node-0" else 1]
    known = nodes(*(f"node-{i}" for i in range(20)))
    known[nearest.node_name] = NodeInfo(nearest.node_name, unschedulable=True)
    chosen = select_neighbours(pods, known, own_pod="p0", own_node="node-0", limit=3)
    assert len(chosen) == 3
    assert nearest.name not in [n.pod_name for n in chosen]


# The whole cluster ----------------------------------------------------------------------


def cluster(size: int) -> tuple[list[PodInfo], dict[str, NodeInfo]]:
    pods = [pod(f"kubenurse-{i:04d}", f"node-{i:04d}", ip=f"10.{i // 256}.{i % 256}.1") for i in range(size)]
    random.Random(size).shuffle(pods)
    return pods, nodes(*(f"node-{i:04d}" for i in range(size)))


def test_with_limit_10_every_node_is_checked_by_exactly_10_others() -> None:
    pods, known = cluster(1000)
    incoming: Counter[str] = Counter()
    for me in pods:
        chosen = select_neighbours(pods, known, own_pod=me.name, own_node=me.node_name, limit=10)
        assert len(chosen) == 10
        assert me.node_name not in {n.node_name for n in chosen}
        assert len({n.node_name for n in chosen}) == 10
        incoming.update(n.node_name for n in chosen)
    assert set(incoming) == set(known)
    assert set(incoming.values()) == {10}


def test_limit_0_checks_everyone_else() -> None:
    pods, known = cluster(50)
    me = pods[0]
    chosen = select_neighbours(pods, known, own_pod=me.name, own_node=me.node_name, limit=0)
    assert sorted(n.pod_name for n in chosen) == sorted(p.name for p in pods if p is not me)


def test_a_departed_node_is_replaced_by_the_next_on_the_ring() -> None:
    pods, known = cluster(100)
    me = pods[0]
    before = select_neighbours(pods, known, own_pod=me.name, own_node=me.node_name, limit=10)
    gone = before[3].node_name
    del known[gone]
    after = select_neighbours(pods, known, own_pod=me.name, own_node=me.node_name, limit=10)
    ring = [p for p in ring_order(pods, me.node_name) if p.name != me.name]
    expected = [p.name for p in ring if p.node_name != gone][:10]
    assert [n.pod_name for n in after] == expected
    # Only the departed node changed: nine of ten stay, so their series stay too.
    assert len({n.pod_name for n in before} & {n.pod_name for n in after}) == 9


# The ring front: selection from partial node facts ----------------------------------------


def _cluster(rng: random.Random, size: int) -> tuple[list[PodInfo], dict[str, NodeInfo]]:
    pods, all_nodes = [], {}
    for i in range(size):
        node = f"node-{i}"
        roll = rng.random()
        if roll < 0.1:
            all_nodes[node] = NodeInfo(node, unschedulable=True)
        elif roll < 0.2:
            all_nodes[node] = NodeInfo(node, unschedulable_taint=True)
        elif roll > 0.95:
            pass  # the node is gone, its pod lingers
        else:
            all_nodes[node] = NodeInfo(node)
        for k in range(1 + (rng.random() < 0.1)):  # some nodes run two probe pods
            pods.append(pod(f"p-{i}-{k}", node, phase="Running" if rng.random() < 0.95 else "Pending"))
    return pods, all_nodes


def _converge(pods: list[PodInfo], all_nodes: dict[str, NodeInfo], limit: int, spares: int) -> tuple[object, ...]:
    """What discovery does: watch what ring_front wants, select again, until it settles."""
    cordoned = {n for n, info in all_nodes.items() if info.unschedulable}
    facts: dict[str, NodeInfo | None] = {}
    for _ in range(50):
        front = ring_front(pods, cordoned=cordoned, facts=facts, own_pod="p-0-0", own_node="node-0",
                           limit=limit, spares=spares, max_wanted=limit + spares + 20)
        wanted = {n: all_nodes.get(n) for n in front.wanted}
        if wanted == facts:
            return front.neighbours, front.wanted
        facts = wanted
    raise AssertionError("did not settle")


@pytest.mark.parametrize("seed", range(20))
def test_ring_front_selects_exactly_what_full_facts_select(seed: int) -> None:
    rng = random.Random(seed)
    pods, all_nodes = _cluster(rng, rng.randrange(5, 300))
    limit = rng.choice([1, 3, 10])
    neighbours, wanted = _converge(pods, all_nodes, limit, spares=2)
    assert neighbours == select_neighbours(pods, all_nodes, own_pod="p-0-0", own_node="node-0", limit=limit)
    # Only the ring front is watched: the taken nodes, nodes skipped for taints or absence, 2 spares.
    taken = {n.node_name for n in neighbours}
    assert taken <= set(wanted)
    assert len(wanted) <= limit + 2 + sum(1 for n in wanted if n not in all_nodes or not all_nodes[n].schedulable)


def test_ring_front_takes_no_node_before_its_facts_arrive() -> None:
    pods = [pod("a", "n1"), pod("b", "n2"), pod("c", "n3")]
    front = ring_front(pods, cordoned=(), facts={}, own_pod="me", own_node="n0", limit=2, spares=1, max_wanted=10)
    assert front.neighbours == () and sorted(front.wanted) == ["n1", "n2", "n3"]
    facts = {"n1": NodeInfo("n1"), "n2": None, "n3": NodeInfo("n3", unschedulable_taint=True)}
    front = ring_front(pods, cordoned=(), facts=facts, own_pod="me", own_node="n0", limit=2, spares=1, max_wanted=10)
    assert [n.pod_name for n in front.neighbours] == ["a"]  # n2 gone, n3 tainted
    front = ring_front(pods, cordoned={"n1"}, facts=facts, own_pod="me", own_node="n0", limit=2, spares=1,
                       max_wanted=2)
    assert len(front.wanted) == 2  # capped
    assert "a" not in [n.pod_name for n in front.neighbours]  # on a cordoned node: skipped


def test_ring_front_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        ring_front([], cordoned=(), facts={}, own_pod="", own_node="", limit=0, spares=0, max_wanted=1)


def test_known_eligible_leaves_out_what_is_known_unusable() -> None:
    pods = [pod("a", "n1"), pod("b", "n2"), pod("c", "n3"), pod("d", "n4"), pod("e", "n5", phase="Pending")]
    facts = {"n2": None, "n3": NodeInfo("n3", unschedulable_taint=True), "n4": NodeInfo("n4")}
    chosen = known_eligible(pods, cordoned={"n1"}, facts=facts, own_pod="me", own_node="n0")
    assert [n.pod_name for n in chosen] == ["d"]  # n1 cordoned, n2 gone, n3 tainted, e pending
    everything = known_eligible(pods, cordoned=(), facts={}, own_pod="me", own_node="n0")
    assert sorted(n.pod_name for n in everything) == ["a", "b", "c", "d"]  # unknown nodes count as usable


@pytest.mark.parametrize("seed", range(10))
def test_every_selection_applies_the_same_pod_and_node_rules(seed: int) -> None:
    """`eligible`, `known_eligible` and `ring_front` share one eligibility rule: given the
    full facts they pick the same pods (terminating, IP-less, pending, this pod, gone,
    cordoned and tainted nodes all mixed in)."""
    rng = random.Random(seed)
    pods, all_nodes = _cluster(rng, rng.randrange(5, 120))
    pods += [pod("gone", "node-1", terminating=True), pod("no-ip", "node-2", ip=""), pod("p-0-0", "node-3")]
    rng.shuffle(pods)
    facts: dict[str, NodeInfo | None] = {p.node_name: all_nodes.get(p.node_name) for p in pods}
    want = ring_order(eligible(pods, all_nodes, own_pod="p-0-0", allow_unschedulable=False), "node-0")
    names = [p.name for p in want]
    assert "gone" not in names and "no-ip" not in names and "p-0-0" not in names
    known = known_eligible(pods, cordoned=(), facts=facts, own_pod="p-0-0", own_node="node-0")
    assert [n.pod_name for n in known] == names
    front = ring_front(pods, cordoned=(), facts=facts, own_pod="p-0-0", own_node="node-0",
                       limit=len(pods), spares=0, max_wanted=len(pods))
    assert [n.pod_name for n in front.neighbours] == names
