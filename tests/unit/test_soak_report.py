"""The soak report's counts on both sides of the faults (pure logic: a ledger filled by hand)."""

from __future__ import annotations

from deploykit.mqttclient import BrokerAddress
from deploykit.soak import Entry, FaultRecord, RetryingClients


def ledger_at(start: float, sent_at: list[tuple[float, bool]]) -> RetryingClients:
    clients = RetryingClients(BrokerAddress("127.0.0.1"), "general", None, sessions=2)
    for i, (at, answered) in enumerate(sent_at):
        entry = Entry(session=f"s{i % 2}", first_sent=start + at)
        if answered:
            entry.answered_at = start + at + 0.5
            entry.answers.add(b"x")
        clients.ledger[f"r{i}"] = entry
    return clients


def test_answers_are_counted_before_the_first_fault_and_after_the_last_recovery() -> None:
    start = 1000.0
    clients = ledger_at(
        start,
        # before the fault at 10 s: 2 answered, 1 not; during the outage (10-25 s): 2;
        # after the recovery at 25 s: 1 answered, 1 not
        [(1, True), (5, True), (9, False), (11, True), (24.9, True), (25, True), (30, False)],
    )
    faults = [FaultRecord("bridge-kill", 10.0, 14.0, 25.0)]
    report = clients.report(40.0, faults, start)
    assert (report.answered_before_faults, report.answered_after_faults) == (2, 1)
    assert report.answered == 5
    assert report.lost == ["r2", "r6"]
    assert "2 sent before the first fault, 1 sent after the last one recovered" in report.text()
    assert report.as_dict()["answered_after_faults"] == 1


def test_nothing_counts_after_a_fault_that_did_not_recover() -> None:
    start = 50.0
    clients = ledger_at(start, [(1, True), (20, True)])
    report = clients.report(30.0, [FaultRecord("engine-hang", 10.0, None, None)], start)
    assert (report.answered_before_faults, report.answered_after_faults) == (1, 0)
    assert not report.ok


def test_several_faults_count_from_the_first_and_to_the_last() -> None:
    start = 0.0
    clients = ledger_at(start, [(2, True), (12, True), (22, True), (40, True), (41, True)])
    faults = [
        FaultRecord("bridge-kill", 10.0, 5.0, 16.0),
        FaultRecord("broker-restart", 20.0, 8.0, 30.0),
    ]
    report = clients.report(45.0, faults, start)
    assert (report.answered_before_faults, report.answered_after_faults) == (1, 2)
