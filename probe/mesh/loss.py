"""Where packets are lost: verdicts from the UDP trains every probe sends its neighbours.

Each probe reports, for each neighbour it sends trains to, how many datagrams its recent
trains sent and how many did not come back (`UdpPathView`), whether the last train failed at
`mtu`, and, for the trains whose id the neighbour's echo also reported, how many were lost
on the way there and how many on the way back (`directions`). From that:

1. MTU: full-size datagrams lost while small ones come back. Towards one node from two probes
   or more (or from every probe that checks it): `node_mtu` on that node; from one probe
   towards two nodes or more: `node_mtu` on that probe's node; else `path_mtu` on the path.
2. Loss: a path losing at least LOSSY_SHARE of at least MIN_SENT datagrams (at least MIN_LOST
   of them), MTU failures aside. Grouped the same way into `node_lossy` (towards or from a
   node: its link), else `path_lossy`. The direction is read from the echo's counts: "on
   the way there", "on the way back" or "both ways".

A verdict about a node needs two witnesses (a lying probe changes only its own row); one
probe's word is a path verdict, `likely` at most.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from probe.mesh.verdict import LIKELY, SURE, UNSURE, Verdict

PATH_LOSSY = "path_lossy"
NODE_LOSSY = "node_lossy"
PATH_MTU = "path_mtu"
NODE_MTU = "node_mtu"

#: A path is lossy from this share of its datagrams lost, over at least MIN_SENT (eight
#: trains) with at least MIN_LOST lost: a healthy pod network loses none.
LOSSY_SHARE = 0.05
MIN_SENT = 30
MIN_LOST = 3
MIN_LOSSY_TRAINS = 2
#: A direction is named when its losses are at least this many times the other's.
DIRECTION_FACTOR = 2.0
#: Datagrams lost either way, of the trains the echo counted, before a way is named: a handful
#: split 7 to 2 is what even loss gives often enough (a verdict forms while the window still
#: holds the trains from before the fault; the sandbox losing 40% each way read "on the way
#: in" on such a handful).
MIN_DIRECTION_LOSSES = 12


@dataclass(frozen=True, slots=True)
class UdpPathView:
    source: str
    target: str
    #: Datagrams of the source's recent trains to the target, and those not back in time.
    sent: int
    lost: int
    #: The last train lost every full-size datagram while small ones came back.
    mtu_failed: bool = False
    #: The path MTU the full-size datagrams were sized to.
    mtu: int | None = None
    #: Of the trains the target's echo also counted: lost before reaching it, and after.
    lost_there: int | None = None
    lost_back: int | None = None
    #: Datagrams of those matched trains (the share lost each way is of what set out that way).
    matched_sent: int | None = None
    #: Trains that lost some of their datagrams (None: not known). A lossy path loses in
    #: several; one train cut short by a probe stopping or starting is no lossy path.
    lossy_trains: int | None = None

    @property
    def share(self) -> float:
        return self.lost / self.sent if self.sent else 0.0

    @property
    def lossy(self) -> bool:
        spread = self.lossy_trains is None or self.lossy_trains >= MIN_LOSSY_TRAINS
        return (
            not self.mtu_failed and spread
            and self.sent >= MIN_SENT and self.lost >= MIN_LOST and self.share >= LOSSY_SHARE
        )


def directions(
    trains: Iterable[tuple[Hashable, int, int]], arrived: Mapping[Hashable, int]
) -> tuple[int, int, int] | None:
    """(lost on the way there, lost on the way back, sent) over the trains (id, sent, came
    back) whose id the echo reported (`arrived`: id -> datagrams that reached it); None if none."""
    there = back = total = 0
    matched = False
    for train_id, sent, came_back in trains:
        if train_id not in arrived:
            continue
        reached = min(arrived[train_id], sent)
        if reached < came_back:
            continue  # the echo's count is older than the train's end: no evidence either way
        matched = True
        total += sent
        there += sent - reached
        back += max(reached - came_back, 0)
    return (there, back, total) if matched else None


def _direction(paths: Sequence[UdpPathView], there_words: str, back_words: str) -> str:
    there = sum(p.lost_there or 0 for p in paths)
    back = sum(p.lost_back or 0 for p in paths)
    if not any(p.lost_there is not None for p in paths) or there + back == 0:
        return "which way is unknown (the echo's counts did not come back)"
    if there + back < MIN_DIRECTION_LOSSES:
        return f"which way is not clear yet ({there} lost on the way there, {back} on the way back)"
    # Shares, not counts: what is lost on the way there never sets out on the way back, so the
    # same loss each way loses fewer datagrams back than there.
    sent = sum(p.matched_sent if p.matched_sent is not None else p.sent for p in paths)
    there_share = there / sent if sent else 0.0
    back_share = back / (sent - there) if sent > there else 0.0
    if there_share >= DIRECTION_FACTOR * back_share:
        return there_words
    if back_share >= DIRECTION_FACTOR * there_share:
        return back_words
    return "both ways"


def _line(p: UdpPathView) -> str:
    text = f"{p.source} -> {p.target}: {p.lost} of {p.sent} datagrams lost ({p.share:.0%})"
    if p.lost_there is not None and p.lost_back is not None and p.lost_there + p.lost_back:
        text += f", {p.lost_there} on the way there, {p.lost_back} on the way back"
    return text


def _mtu_line(p: UdpPathView) -> str:
    size = f" (sized to the path MTU {p.mtu})" if p.mtu else ""
    return f"{p.source} -> {p.target}: full-size datagrams{size} lost, small ones came back"


def _group(
    flagged: Sequence[UdpPathView], all_paths: Sequence[UdpPathView]
) -> tuple[dict[str, list[UdpPathView]], dict[str, list[UdpPathView]]]:
    """Flagged paths by target and by source, where two witnesses or more (or all the node's
    paths, when that is at least two) agree: the node's link, not one path."""
    def grouped(key: str) -> dict[str, list[UdpPathView]]:
        out: dict[str, list[UdpPathView]] = {}
        for p in flagged:
            out.setdefault(getattr(p, key), []).append(p)
        total = {n: sum(1 for p in all_paths if getattr(p, key) == n) for n in out}
        return {n: ps for n, ps in out.items() if len(ps) >= 2 and len(ps) * 2 >= total[n]}

    return grouped("target"), grouped("source")


def judge_loss(paths: Sequence[UdpPathView]) -> list[Verdict]:
    """MTU and loss verdicts, node verdicts first; an empty list when no path loses."""
    verdicts: list[Verdict] = []
    mtu = [p for p in paths if p.mtu_failed]
    verdicts += _node_verdicts(mtu, paths, NODE_MTU, PATH_MTU, _mtu_summary, _mtu_line)
    lossy = [p for p in paths if p.lossy]
    verdicts += _node_verdicts(lossy, paths, NODE_LOSSY, PATH_LOSSY, _loss_summary, _line)
    return verdicts


Summary = Callable[[str, Sequence[UdpPathView], bool | None], str]


def _node_verdicts(
    flagged: Sequence[UdpPathView],
    paths: Sequence[UdpPathView],
    node_kind: str,
    path_kind: str,
    summary: Summary,
    line: Callable[[UdpPathView], str],
) -> list[Verdict]:
    verdicts: list[Verdict] = []
    by_target, by_source = _group(flagged, paths)
    explained: set[tuple[str, str]] = set()
    # The side that explains more paths is named; the target first where they tie.
    nodes = sorted(
        [(n, ps, True) for n, ps in by_target.items()] + [(n, ps, False) for n, ps in by_source.items()],
        key=lambda item: (-len(item[1]), not item[2], item[0]),
    )
    for node, group, towards in nodes:
        group = [p for p in group if (p.source, p.target) not in explained]
        if len(group) < 2:
            continue
        explained |= {(p.source, p.target) for p in group}
        confidence = SURE if len(group) >= 3 or sum(p.sent for p in group) >= 100 else LIKELY
        verdicts.append(Verdict(node_kind, node, confidence, summary(node, group, towards),
                                tuple(line(p) for p in group)))
    for p in flagged:
        if (p.source, p.target) in explained:
            continue
        # One probe's word about a path: it may be that probe's own doing, or a lie.
        confidence = LIKELY if p.sent >= 2 * MIN_SENT or path_kind == PATH_MTU else UNSURE
        subject = f"{p.source}->{p.target}"
        verdicts.append(Verdict(path_kind, subject, confidence, summary(subject, [p], None), (line(p),)))
    return verdicts


def _loss_summary(subject: str, group: Sequence[UdpPathView], towards: bool | None) -> str:
    sent, lost = sum(p.sent for p in group), sum(p.lost for p in group)
    share = f"{lost / sent:.0%} of {sent} datagrams" if sent else "datagrams"
    if towards is None:
        which = _direction(group, "on the way there", "on the way back")
        return f"The path {subject} loses packets: {share} lost, {which}."
    inward, outward = f"on the way in to {subject}", f"on the way out of {subject}"
    there, back = (inward, outward) if towards else (outward, inward)
    side = "towards" if towards else "from"
    return f"{subject} loses packets: {share} {side} it lost on {len(group)} paths, {_direction(group, there, back)}."


def _mtu_summary(subject: str, group: Sequence[UdpPathView], towards: bool | None) -> str:
    sizes = sorted({p.mtu for p in group if p.mtu})
    size = f" ({', '.join(map(str, sizes))} bytes)" if sizes else ""
    if towards is None:
        return f"The path {subject} drops full-size packets{size} while small ones pass: an MTU mismatch."
    side = "to" if towards else "from"
    return (
        f"{subject} drops full-size packets{size} on {len(group)} paths {side} it while small ones pass: "
        "an MTU mismatch on its link (overlay encapsulation, an interface MTU)."
    )
