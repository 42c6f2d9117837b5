"""Counting crashes from crash markers: what a partition's owner writes, and what the next owner reads from it.

The pure rules of the quarantine (worker/kafka/quarantine.py): no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

#: Live hand-overs with records running (``Marker.revoked``), in a row at one resume offset, that count
#: as one crash. In the chaos soak 5 of 12 crashes counted were such hand-overs, each then read one
#: record at a time (p99 26 s against 8 s); at 2, a killer that always outlives its owner's membership
#: costs at most 2 deaths per crash counted (plus one each time the group's commit moved in between).
HANDOVERS_PER_CRASH = 2


@dataclass(frozen=True)
class Marker:
    """What a partition's owner last wrote: which offsets may be running, and the crash count it carries."""

    #: highest offset that may be running while ``armed``
    upto: int
    #: True from before a round runs until a revoke or drain finds nothing running
    armed: bool
    #: crashes with several records running, charged to every record up to ``suspect_to``
    crashes: int = 0
    #: armed over the one record ``upto`` alone: a crash now names it
    alone: bool = False
    #: last offset still read one record at a time (-1: none)
    suspect_to: int = -1
    #: the process that wrote it (a process never counts its own live marker as a crash)
    writer: str = ""
    #: crashes so far while the offset ``named_at`` ran alone (markers from before ``alone_crashes``)
    named: int = 0
    #: armed, but its writer let the partition go alive (a revoke or drain ran out with records running)
    revoked: bool = False
    #: such hand-overs in a row before this one, at ``resumed_at``
    handed: int = 0
    #: the offset its writer resumed the partition from (-1: not known)
    resumed_at: int = -1
    #: the last offset answered as poison_suspected here (-1: none): an owner that resumes at or before
    #: it (the commit past it failed) answers it so again instead of running it
    poison: int = -1
    #: the crashes that offset caused
    poison_crashes: int = 0
    #: the offset ``named`` counts the crashes of (-1: ``upto``, as in markers written before it was
    #: carried past the named record's own marker)
    named_at: int = -1
    #: crashes per offset while that record ran alone: each record keeps its own count, so a crash with
    #: another cause, while an innocent record runs alone, costs the killer none of its count
    alone_crashes: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The marker as the quarantine topic stores it; ``named``/``named_at`` say the record with the most
        of ``alone_crashes``, as a worker from before them reads it (a rolling upgrade)."""
        data = dict(self.__dict__, alone_crashes={str(k): v for k, v in self.alone_crashes.items()})
        if self.alone_crashes:
            data["named_at"], data["named"] = max(self.alone_crashes.items(), key=lambda kv: (kv[1], kv[0]))
        return json.dumps(data, sort_keys=True).encode()

    def crashes_alone(self) -> dict[int, int]:
        """Crashes per offset while it ran alone; from ``named``/``named_at`` in a marker that predates them."""
        if self.alone_crashes:
            return dict(self.alone_crashes)
        return {self.named_at if self.named_at >= 0 else self.upto: self.named} if self.named else {}

    @classmethod
    def from_json(cls, raw: bytes) -> Marker | None:
        """A marker read back; None for a record that is not one (never raises)."""
        try:
            data = json.loads(raw)
            return cls(
                upto=int(data["upto"]),
                armed=bool(data["armed"]),
                crashes=int(data.get("crashes", 0)),
                alone=bool(data.get("alone", False)),
                suspect_to=int(data.get("suspect_to", -1)),
                writer=str(data.get("writer", "")),
                named=int(data.get("named", 0)),
                revoked=bool(data.get("revoked", False)),
                handed=int(data.get("handed", 0)),
                resumed_at=int(data.get("resumed_at", -1)),
                poison=int(data.get("poison", -1)),
                poison_crashes=int(data.get("poison_crashes", 0)),
                named_at=int(data.get("named_at", -1)),
                alone_crashes={int(k): int(v) for k, v in data.get("alone_crashes", {}).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True)
class Suspicion:
    """A partition's state as its owner reads it: crashes counted, and how far to read one at a time."""

    #: crashes with several records running, charged to each record up to ``suspect_to``
    crashes: int = 0
    #: last offset read one record at a time (-1: none, whole rounds run)
    suspect_to: int = -1
    #: crashes per offset while that record ran alone (each named by its crashes)
    named: Mapping[int, int] = field(default_factory=dict)
    #: this reading counted a crash (the last owner died with records running)
    crashed: bool = False
    #: live hand-overs with records running in a row (``Marker.revoked``), none counted as a crash
    handed: int = 0
    #: where the owner resumed the partition (carried in its markers; not part of the count)
    resumed_at: int = field(default=-1, compare=False)
    #: an offset answered as poison_suspected (-1: none), with its crashes: answered so again, not run
    poison: int = -1
    poison_crashes: int = 0

    def suspect(self, offset: int) -> bool:
        """True when ``offset`` must run alone."""
        return offset <= self.suspect_to

    def charged(self, offset: int) -> int:
        """The crashes charged to ``offset``: those of its range, and those while it ran alone."""
        return self.crashes + self.named.get(offset, 0)

    def poisoned(self, offset: int, max_crashes: int) -> bool:
        """True when ``offset`` was named by a crash and has used up its crashes.

        A record that ran alone through a crash and was then answered was not the killer: the next
        record starts from its range's count, so crashes with other causes do not pile up on it.
        """
        return offset == self.poison or (offset in self.named and self.charged(offset) >= max_crashes)

    def crashes_of(self, offset: int) -> int:
        """The crashes to report for ``offset`` answered as poison."""
        return self.poison_crashes if offset == self.poison else self.charged(offset)

    def whole_rounds(self) -> Suspicion:
        """Past the records read one at a time: whole rounds again, an offset answered as poison still so."""
        return Suspicion(poison=self.poison, poison_crashes=self.poison_crashes)


def recover(marker: Marker | None, resume_at: int, me: str) -> Suspicion:
    """A new owner's view of a partition from its last marker and the offset the group resumes from.

    Armed at or below ``upto`` and written by another process: its writer died with those offsets
    running, one crash more, named to ``upto`` if it ran alone, else charged to the whole range.
    Unless it was ``revoked`` (its writer let go alive): no crash, only the hand-over counted, until
    HANDOVERS_PER_CRASH of them in a row at this resume offset count as one.
    Otherwise the count goes on only while the one-at-a-time range lasts.
    An offset the marker says was answered as poison, at or after ``resume_at`` (the commit past it
    failed), is answered so again: the records up to it are read one at a time, so it comes up alone.
    """
    suspicion = _recovered(marker, resume_at, me)
    if marker is not None and resume_at <= marker.poison:
        suspicion = replace(
            suspicion,
            suspect_to=max(suspicion.suspect_to, marker.poison),
            poison=marker.poison,
            poison_crashes=marker.poison_crashes,
        )
    return replace(suspicion, resumed_at=resume_at)


def _recovered(marker: Marker | None, resume_at: int, me: str) -> Suspicion:
    if marker is None:
        return Suspicion()
    if marker.armed and resume_at <= marker.upto and marker.writer != me:
        handed = (marker.handed if resume_at == marker.resumed_at else 0) + 1
        if marker.revoked and handed < HANDOVERS_PER_CRASH:
            return Suspicion(marker.crashes, marker.suspect_to, _named(marker, resume_at), handed=handed)
        suspect_to = max(marker.suspect_to, marker.upto)
        if marker.alone:
            # A crash while one record ran alone names it; every other record keeps its own count.
            named = _named(marker, resume_at)
            named[marker.upto] = named.get(marker.upto, 0) + 1
            return Suspicion(marker.crashes, suspect_to, named, crashed=True)
        return Suspicion(marker.crashes + 1, suspect_to, _named(marker, resume_at), crashed=True)
    if resume_at <= marker.suspect_to:
        return Suspicion(marker.crashes, marker.suspect_to, _named(marker, resume_at))
    return Suspicion()


def _named(marker: Marker, resume_at: int) -> dict[int, int]:
    """The marker's crashes per record that ran alone, but those the group resumes past (answered: not the
    killer). Innocent records read alone before one, crashes with other causes, and hand-overs keep it."""
    return {offset: count for offset, count in marker.crashes_alone().items() if offset >= resume_at}
