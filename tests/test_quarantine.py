"""The quarantine's counting rules (worker/kafka/quarantine.py), pure: no broker, no process.

Each case is a history told by hand: what the last owner of a partition wrote before it went
away, and where the group resumes. The expected counts are worked out in the comments, not
taken from the code.
"""

from __future__ import annotations

from worker.kafka.crash_markers import Marker, Suspicion, recover

ME, DEAD = "this-process", "a-dead-process"
MAX = 3


def test_no_marker_means_no_crash() -> None:
    assert recover(None, resume_at=0, me=ME) == Suspicion()


def test_an_owner_that_died_with_a_round_running_costs_one_crash_over_the_whole_round() -> None:
    # It armed offsets up to 20 and died; the group resumes at 7 (0..6 answered and committed).
    died = Marker(upto=20, armed=True, writer=DEAD)
    suspicion = recover(died, resume_at=7, me=ME)
    assert suspicion == Suspicion(crashes=1, suspect_to=20, crashed=True)
    # 7..20 now run one at a time; 21 and later as whole rounds.
    assert suspicion.suspect(7) and suspicion.suspect(20) and not suspicion.suspect(21)
    # A crash over many records names none of them: nothing is quarantined on it, even at max 1.
    assert not suspicion.poisoned(7, max_crashes=1)


def test_a_partition_answered_past_the_marker_is_not_charged() -> None:
    # Armed up to 20, everything answered and committed (resume at 21), then the process died
    # for another reason: nothing of this partition was running.
    assert recover(Marker(upto=20, armed=True, writer=DEAD), resume_at=21, me=ME) == Suspicion()


def test_a_clean_revoke_does_not_count() -> None:
    # The last owner disarmed the marker on revoke, with records 10..20 not yet answered
    # (the revoke's wait ran out after it had disarmed nothing of a running one: armed=False).
    assert recover(Marker(upto=20, armed=False, writer=DEAD), resume_at=10, me=ME) == Suspicion()


def test_a_process_never_counts_its_own_live_marker() -> None:
    # Revoked with a record still running (marker left armed) and assigned the partition back:
    # this process is alive, so no crash happened.
    assert recover(Marker(upto=20, armed=True, writer=ME), resume_at=10, me=ME) == Suspicion()


def test_a_record_that_crashes_alone_is_named_and_quarantined_at_the_third_crash() -> None:
    # Death 1: a round 0..20 running.
    first = recover(Marker(upto=20, armed=True, writer=DEAD), resume_at=0, me=ME)
    assert (first.crashes, first.named, first.charged(0)) == (1, {}, 1)
    # Death 2: offset 0 armed alone with the range's count 1 and no crash of its own yet.
    alone = Marker(upto=0, armed=True, crashes=1, alone=True, suspect_to=20, writer=DEAD)
    second = recover(alone, resume_at=0, me=ME)
    assert second == Suspicion(crashes=1, suspect_to=20, named={0: 1}, crashed=True)
    assert second.charged(0) == 2 and not second.poisoned(0, MAX)
    # Death 3: armed alone again, one crash of its own; the next owner finds 1 + 2 crashes on 0.
    third = recover(Marker(0, True, 1, True, 20, DEAD, named=1), resume_at=0, me=ME)
    assert third.charged(0) == 3
    assert third.poisoned(0, MAX)
    assert not third.poisoned(1, MAX), "only the named offset is skipped"
    assert third.charged(1) == 1, "the records behind it carry only the range's crash"


def test_innocent_records_read_one_at_a_time_carry_the_count_but_are_not_named() -> None:
    # After death 1 (count 1, range ..20), offsets 0..9 ran alone and were answered; offset 10
    # was armed alone and killed the worker: resume at 10.
    marker = Marker(upto=10, armed=True, crashes=1, alone=True, suspect_to=20, writer=DEAD)
    assert recover(marker, resume_at=10, me=ME) == Suspicion(1, 20, named={10: 1}, crashed=True)


def test_crashes_while_other_records_ran_alone_do_not_pile_up_on_the_next() -> None:
    # Death 1 over a round (range count 1); death 2 while offset 5 ran alone; 5 then ran alone again
    # and was answered: it was not the killer. Death 3 strikes while 6 runs alone (armed with the
    # range's count and none of its own): 6 has 2 crashes charged, not 3, and is run again.
    marker = Marker(upto=6, armed=True, crashes=1, alone=True, suspect_to=20, writer=DEAD)
    suspicion = recover(marker, resume_at=6, me=ME)
    assert suspicion.charged(6) == 2
    assert not suspicion.poisoned(6, MAX)


def test_an_answer_whose_commit_was_lost_still_counts_the_crash_at_the_next_record() -> None:
    # Offset 9 was answered but its commit never landed; 10 was armed alone and killed the worker.
    marker = Marker(upto=10, armed=True, crashes=1, alone=True, suspect_to=20, writer=DEAD)
    assert recover(marker, resume_at=9, me=ME) == Suspicion(1, 20, named={10: 1}, crashed=True)


def test_a_revoke_during_one_at_a_time_reading_hands_the_count_on() -> None:
    # Count 2 over ..20, offset 5 answered, revoked and disarmed: the next owner resumes at 6
    # with count 2 (no crash added) and still reads one at a time through 20.
    disarmed = Marker(upto=5, armed=False, crashes=2, suspect_to=20, writer=DEAD)
    assert recover(disarmed, resume_at=6, me=ME) == Suspicion(crashes=2, suspect_to=20)
    # Past the range, the count is gone.
    assert recover(disarmed, resume_at=21, me=ME) == Suspicion()


def test_a_poison_verdict_whose_commit_failed_is_answered_again_without_running() -> None:
    # Offset 5 killed three workers and was answered as poison; the commit past it failed (a rebalance)
    # and its owner let the partition go cleanly: the marker is disarmed but carries the verdict.
    # (Simulation seed 117: the next owner ran 5 again, three more deaths.)
    after = Marker(upto=7, armed=False, suspect_to=-1, writer=DEAD, poison=5, poison_crashes=3)
    again = recover(after, resume_at=5, me=ME)
    assert again.poisoned(5, MAX) and again.crashes_of(5) == 3
    assert not again.poisoned(6, MAX)
    # Resumed before it (the commits of 3 and 4 were lost too): 3 and 4 run alone, so 5 comes up alone.
    earlier = recover(after, resume_at=3, me=ME)
    assert earlier.suspect(3) and earlier.suspect(5) and earlier.poisoned(5, MAX)
    # Committed past it: nothing is left of it.
    assert recover(after, resume_at=6, me=ME) == Suspicion()


def test_a_named_count_survives_innocent_records_read_alone_before_it_and_a_hand_over() -> None:
    # Death 1 over 0..3, death 2 while 2 ran alone (named, 1 crash of its own). The next owner resumes
    # at 0 and reads 0 alone; it hangs, and a revoke lets the partition go alive (a hand-over). Its
    # marker carries 2's count. (Simulation seed 106: it did not, and 2 killed five workers.)
    handed = Marker(0, True, 1, True, 3, DEAD, named=1, revoked=True, resumed_at=0, named_at=2)
    after_handover = recover(handed, resume_at=0, me=ME)
    assert (after_handover.named, after_handover.charged(2)) == ({2: 1}, 2)
    # 0 and 1 answered, 2 armed alone with its count, and the third death: 1 + 2 crashes, quarantined.
    third = recover(Marker(2, True, 1, True, 3, DEAD, named=1, named_at=2), resume_at=2, me=ME)
    assert third.charged(2) == 3 and third.poisoned(2, MAX)
    # A death while another record ran alone names that one too, and 2 keeps its own count: a crash
    # with another cause costs the killer none of its count. (Simulation seed 39: the name moved to the
    # innocent record, 2's count went, and 2 killed a worker more than max_crash_attempts allow.)
    other = recover(Marker(0, True, 1, True, 3, DEAD, named=1, named_at=2), resume_at=0, me=ME)
    assert (other.named, other.charged(0), other.charged(2)) == ({2: 1, 0: 1}, 2, 2)
    # 0 answered (the group resumes at 1): its count goes, 2's stays; 2 dies alone once more: quarantined.
    past = Marker(2, True, 1, True, 3, DEAD, alone_crashes={0: 1, 2: 1})
    assert recover(past, resume_at=1, me=ME).named == {2: 2}
    assert recover(past, resume_at=1, me=ME).poisoned(2, MAX)
    # A death with several records running after that keeps each record's count and adds one to all.
    over = recover(Marker(3, True, 1, False, 3, DEAD, alone_crashes={2: 1}), resume_at=2, me=ME)
    assert (over.crashes, over.named, over.charged(2), over.charged(3)) == (2, {2: 1}, 3, 2)


def test_a_marker_survives_its_wire_form_and_junk_is_not_a_marker() -> None:
    marker = Marker(upto=41, armed=True, crashes=2, alone=True, suspect_to=60, writer=DEAD, named=1)
    assert Marker.from_json(marker.to_json()) == marker
    carrying = Marker(upto=41, armed=True, named=2, named_at=44, poison=39, poison_crashes=3)
    assert Marker.from_json(carrying.to_json()) == carrying
    # Counts per record; the wire form also names the one with the most, as a worker before them reads it.
    counted = Marker(upto=41, armed=True, alone=True, writer=DEAD, alone_crashes={41: 1, 44: 2})
    wire = Marker.from_json(counted.to_json())
    assert wire is not None and wire.crashes_alone() == {41: 1, 44: 2}
    assert (wire.named, wire.named_at) == (2, 44)
    assert Marker.from_json(b'{"upto": 1, "armed": true, "alone_crashes": [1]}') is None
    # Written before a marker carried a named count past its own record, or a poison verdict.
    old = Marker.from_json(b'{"upto": 41, "armed": true, "alone": true, "named": 1}')
    assert old is not None and (old.named_at, old.poison, old.poison_crashes) == (-1, -1, 0)
    assert Marker.from_json(b"not json") is None
    assert Marker.from_json(b'{"upto": "x", "armed": true}') is None
    assert Marker.from_json(b'{"armed": true}') is None


def test_a_live_hand_over_with_records_running_counts_no_crash_until_it_repeats() -> None:
    # The last owner armed 7..20, its revoke's wait ran out with some still running, and it marked the
    # marker revoked: it was alive when it let go. The group resumes at 7, where that owner resumed too.
    handed = Marker(upto=20, armed=True, writer=DEAD, revoked=True, resumed_at=7)
    first = recover(handed, resume_at=7, me=ME)
    # No crash, nothing read one at a time: whole rounds, one hand-over remembered.
    assert first == Suspicion(handed=1) and not first.crashed and not first.suspect(7)
    # The next owner armed 7..25 carrying that hand-over, and let go the same way before anything of 7
    # was committed: the second hand-over in a row at 7 counts as one crash over the range.
    again = Marker(upto=25, armed=True, writer=DEAD, revoked=True, handed=1, resumed_at=7)
    assert recover(again, resume_at=7, me=ME) == Suspicion(crashes=1, suspect_to=25, crashed=True)
    # Had 7 and 8 been answered and committed in between (resume at 9), the streak starts over.
    assert recover(again, resume_at=9, me=ME) == Suspicion(handed=1)


def test_a_live_hand_over_while_one_record_ran_alone_keeps_the_count_it_carried() -> None:
    # After one crash over ..20, offset 12 ran alone with one crash of its own when the revoke came.
    alone = Marker(
        upto=12, armed=True, crashes=1, alone=True, suspect_to=20, writer=DEAD, named=1, revoked=True
    )
    suspicion = recover(alone, resume_at=12, me=ME)
    # Still read one at a time with the same counts (1 over the range, 1 named on 12); no crash added.
    assert suspicion == Suspicion(crashes=1, suspect_to=20, named={12: 1}, handed=1)
    assert suspicion.charged(12) == 2 and not suspicion.crashed
