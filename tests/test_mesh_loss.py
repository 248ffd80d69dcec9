"""Loss and MTU verdicts from small tables of UDP paths (probe/mesh/loss.py)."""

from __future__ import annotations

import json

import pytest

from probe.mesh import loss
from probe.mesh.collect import Gathered, evidence_from, peer
from probe.mesh.loss import UdpPathView, directions, judge_loss
from probe.mesh.report import BadReport, Report, UdpPathReport, parse
from probe.mesh.verdicts import LIKELY, SURE, UNSURE, judge

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
    assert directions(trains, {1: 9, 2: 10}) == (1, 1, 20)
    assert directions(trains, {}) is None
    assert directions([(1, 10, 10)], {1: 12}) == (0, 0, 10), "a duplicate is not a negative loss"
    assert directions([(1, 10, 9)], {1: 4}) is None, "an echo count older than the train says nothing"


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
    one = UdpPathView("node-1", "node-2", 100, 12, lost_there=6, lost_back=6)
    (verdict,) = judge_loss(clean(node1_node2=one))
    assert (verdict.kind, verdict.subject, verdict.confidence) == (loss.PATH_LOSSY, "node-1->node-2", LIKELY)
    assert "both ways" in verdict.summary


def test_a_handful_of_losses_names_no_way_yet() -> None:
    """A verdict can form while the window still holds the trains from before the fault: 7
    lost there and 2 back is what even loss gives often enough, so no way is named yet."""
    lossy = {
        "node1_node3": UdpPathView("node-1", "node-3", 52, 5, lost_there=4, lost_back=1),
        "node2_node3": UdpPathView("node-2", "node-3", 52, 4, lost_there=3, lost_back=1),
    }
    (verdict,) = judge_loss(clean(**lossy))
    assert verdict.kind == loss.NODE_LOSSY
    assert "which way is not clear yet (7 lost on the way there, 2 on the way back)" in verdict.summary, verdict.summary
    assert "way in" not in verdict.summary


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


# --- through the reports: what each probe says, read back, judged -----------------------------


def report(node: str, udp: tuple[UdpPathReport, ...] = (), echo: tuple[tuple[str, int], ...] = ()) -> Report:
    return parse(Report(node, f"pod-{node}", udp=udp, echo=echo).encode())  # what a peer would read


def test_udp_paths_and_echo_counts_survive_the_report_as_they_were() -> None:
    sent = UdpPathReport("node-2", 100, 7, False, 1500, (("00000000000000ab", 10, 8),))
    read = report("node-1", (sent,), (("00000000000000cd", 10),))
    assert read.udp == (sent,) and read.echo == (("00000000000000cd", 10),)


@pytest.mark.parametrize("udp", [
    {"to": "node-2", "sent": True, "lost": 0},
    {"to": "node-2", "sent": -1, "lost": 0},
    {"to": "node-2", "sent": 10, "lost": 0, "trains": [["xyz", 10, 10]]},
    {"to": "node-2", "sent": 10, "lost": 0, "trains": [["00000000000000ab", 10, 10]] * 11},
    {"to": "../../x", "sent": 10, "lost": 0},
    {"to": "node-2", "sent": 10, "lost": 0, "mtu": 1e9},
])
def test_forged_udp_paths_are_refused(udp: dict[str, object]) -> None:
    body = json.dumps({"node": "node-1", "pod": "pod-1", "results": [], "udp": [udp]}).encode()
    with pytest.raises(BadReport):
        parse(body)


def test_a_lossy_link_of_one_node_is_judged_from_the_reports_with_its_direction() -> None:
    """node-3's link drops datagrams on the way in: three senders lose 12 of 100 each, and
    node-3's echo says those never reached it."""
    trains = {s: tuple((f"{i:014x}{n:02x}", 10, 9 if n < 2 else 8) for n in range(10)) for i, s in enumerate(NODES)}
    reports = {}
    for s in NODES:
        paths = tuple(
            UdpPathReport(t, 100, 12 if t == "node-3" else 0, trains=trains[s] if t == "node-3" else ())
            for t in NODES if t != s
        )
        echo = tuple((tid, b) for src in NODES if src != s for tid, _, b in trains[src]) if s == "node-3" else ()
        reports[s] = report(s, paths, echo)
    peers = {s: peer(s, f"pod-{s}", f"10.0.0.{i}") for i, s in enumerate(NODES)}
    gathered = Gathered(reports["node-1"], reports, peers)
    evidence = evidence_from(gathered)
    verdicts = judge(evidence)
    (verdict,) = [v for v in verdicts if v.kind.endswith("lossy")]
    assert (verdict.kind, verdict.subject) == (loss.NODE_LOSSY, "node-3")
    assert "on the way in to node-3" in verdict.summary, verdict.summary
    assert not [v for v in verdicts if v.kind == "ok"], "loss is something wrong"


def test_the_same_loss_each_way_is_both_ways() -> None:
    """40% each way: 40 of 100 lost there, 24 of the 60 that reached it lost back (fewer by
    count, the same share)."""
    lossy = {
        f"{s}_node3".replace("-", ""): UdpPathView(s, "node-3", 100, 64, lost_there=40, lost_back=24)
        for s in ("node-1", "node-2")
    }
    (verdict,) = judge_loss(clean(**lossy))
    assert "both ways" in verdict.summary, verdict.summary


def test_one_train_cut_short_is_no_lossy_path() -> None:
    """A probe stopping mid-train loses part of one train: an edge of an outage, not loss."""
    one_burst = UdpPathView("node-1", "node-2", 100, 6, lossy_trains=1)
    assert judge_loss(clean(node1_node2=one_burst)) == []
    spread = UdpPathView("node-1", "node-2", 100, 6, lossy_trains=3)
    assert [v.kind for v in judge_loss(clean(node1_node2=spread))] == [loss.PATH_LOSSY]
