"""Loss and MTU verdicts from small tables of UDP paths (probe/mesh/loss.py)."""

from __future__ import annotations

from probe.mesh import loss
from probe.mesh.loss import UdpPathView, directions, judge_loss
from probe.mesh.verdicts import LIKELY, SURE, UNSURE

NODES = ["node-1", "node-2", "node-3", "node-4"]


def clean(**lost: UdpPathView) -> list[UdpPathView]:
    """Every path of a 4-node mesh, 100 datagrams each, none lost, but those given."""
    out = []
    for s in NODES:
        for t in NODES:
            if s != t:
                key = f"{s}_{t}".replace("-", "")
                out.append(lost.get(key, UdpPathView(s, t, 100, 0, lost_there=0, lost_back=0)))
    return out


def test_a_clean_mesh_has_no_verdict() -> None:
    assert judge_loss(clean()) == []


def test_directions_match_trains_with_what_the_echo_counted() -> None:
    trains = [(1, 10, 8), (2, 10, 10), (3, 10, 5)]
    # Train 1: 9 reached the echo, 8 came back; train 3 unknown to the echo (it restarted).
    assert directions(trains, {1: 9, 2: 10}) == (1, 1)
    assert directions(trains, {}) is None
    assert directions([(1, 10, 10)], {1: 12}) == (0, 0), "a duplicate is not a negative loss"


def test_loss_towards_one_node_is_that_nodes_link_and_says_which_way() -> None:
    lossy = {
        f"{s}_node3".replace("-", ""): UdpPathView(s, "node-3", 100, 12, lost_there=11, lost_back=1)
        for s in ("node-1", "node-2", "node-4")
    }
    (verdict,) = judge_loss(clean(**lossy))
    assert (verdict.kind, verdict.subject, verdict.confidence) == (loss.NODE_LOSSY, "node-3", SURE)
    assert "12% of 300 datagrams towards it" in verdict.summary
    assert "on the way in to node-3" in verdict.summary
    assert len(verdict.evidence) == 3 and "11 on the way there, 1 on the way back" in verdict.evidence[0]


def test_loss_on_the_way_back_is_named_as_such() -> None:
    lossy = {
        f"{s}_node3".replace("-", ""): UdpPathView(s, "node-3", 100, 10, lost_there=0, lost_back=10)
        for s in ("node-1", "node-2")
    }
    (verdict,) = judge_loss(clean(**lossy))
    assert verdict.kind == loss.NODE_LOSSY and "on the way out of node-3" in verdict.summary


def test_one_lossy_path_is_a_path_verdict_from_one_witness() -> None:
    one = UdpPathView("node-1", "node-2", 100, 8, lost_there=4, lost_back=4)
    (verdict,) = judge_loss(clean(node1_node2=one))
    assert (verdict.kind, verdict.subject, verdict.confidence) == (loss.PATH_LOSSY, "node-1->node-2", LIKELY)
    assert "both ways" in verdict.summary


def test_too_few_datagrams_or_losses_say_nothing() -> None:
    assert judge_loss(clean(node1_node2=UdpPathView("node-1", "node-2", 20, 5))) == []
    assert judge_loss(clean(node1_node2=UdpPathView("node-1", "node-2", 100, 2))) == []
    (verdict,) = judge_loss(clean(node1_node2=UdpPathView("node-1", "node-2", 40, 4)))
    assert verdict.confidence == UNSURE, "a short history from one probe is no more than a hint"


def test_mtu_towards_one_node_is_its_link_and_is_not_also_loss() -> None:
    mtu = {
        f"{s}_node4".replace("-", ""): UdpPathView(s, "node-4", 100, 20, mtu_failed=True, mtu=1500)
        for s in ("node-1", "node-2", "node-3")
    }
    (verdict,) = judge_loss(clean(**mtu))
    assert (verdict.kind, verdict.subject, verdict.confidence) == (loss.NODE_MTU, "node-4", SURE)
    assert "1500 bytes" in verdict.summary and len(verdict.evidence) == 3


def test_loss_from_one_source_to_everyone_is_the_sources_link() -> None:
    lossy = {
        f"node2_{t}".replace("-", ""): UdpPathView("node-2", t, 100, 15, lost_there=15, lost_back=0)
        for t in ("node-1", "node-3", "node-4")
    }
    (verdict,) = judge_loss(clean(**lossy))
    assert (verdict.kind, verdict.subject) == (loss.NODE_LOSSY, "node-2")
    assert "from it" in verdict.summary and "on the way out of node-2" in verdict.summary
