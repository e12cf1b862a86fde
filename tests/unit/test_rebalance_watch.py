"""RebalanceWatch: a rebalance that shows no progress while the brokers answer gets a new
rejoin of the group; one that advances, or waits for the brokers, is left alone."""

from __future__ import annotations

from types import SimpleNamespace

from kafkaio.health import Health
from streams.rebalance_watch import RebalanceWatch, describe_rebalance, recovery_progress


class Rig:
    def __init__(self) -> None:
        self.now = 0.0
        self.rebalancing = False
        self.progress = 0
        self.reachable = True
        self.rejoins = 0
        self.health = Health(clock=lambda: self.now)
        self.watch = RebalanceWatch(
            rebalancing=lambda: self.rebalancing,
            progress=lambda: self.progress,
            rejoin=self._rejoin,
            reachable=lambda: self.reachable,
            watch=self.health.loop("faust consumer"),
            rejoin_after_s=8.0,
            clock=lambda: self.now,
        )

    def _rejoin(self) -> None:
        self.rejoins += 1

    def run(self, seconds: int) -> list[bool]:
        asked = []
        for _ in range(seconds):
            self.now += 1.0
            asked.append(self.watch.tick())
        return asked


def test_a_settled_consumer_is_ready_and_never_rejoined() -> None:
    rig = Rig()
    assert not any(rig.run(60))
    assert rig.rejoins == 0 and rig.health.report().ready


def test_a_rebalance_that_advances_is_left_alone_however_long() -> None:
    rig = Rig()
    rig.rebalancing = True
    for _ in range(120):  # a long restore: its offsets move every few seconds
        rig.run(3)
        rig.progress += 100
    assert rig.rejoins == 0
    report = rig.health.report()
    assert not report.ready and any("faust consumer" in p for p in report.problems)


def test_a_stalled_rebalance_is_rejoined_once_the_brokers_answer() -> None:
    rig = Rig()
    rig.rebalancing = True
    rig.reachable = False
    assert not any(rig.run(60))  # the brokers are away: a rejoin would wait the same
    rig.reachable = True
    asked = rig.run(8)
    assert asked == [False] * 7 + [True]  # counted from the brokers' return
    assert rig.rejoins == 1
    assert not any(rig.run(7))  # the new rebalance gets as long
    assert rig.run(1) == [True] and rig.rejoins == 2
    rig.progress += 1  # the new rebalance restores
    assert not any(rig.run(7))
    rig.rebalancing = False  # done: ready again, nothing more asked
    assert not any(rig.run(30))
    assert rig.rejoins == 2 and rig.health.report().ready


def test_progress_reads_generation_restore_state_and_offsets() -> None:
    offsets = {"a": 3, "b": 5}
    app = SimpleNamespace(
        consumer_generation_id=4,
        tables=SimpleNamespace(recovery=SimpleNamespace(in_recovery=True, active_offsets=offsets)),
    )
    before = recovery_progress(app)
    offsets["a"] = 9
    assert recovery_progress(app) != before
    app.consumer_generation_id = 5
    progress = recovery_progress(app)
    assert isinstance(progress, tuple) and progress[0] == 5


def test_what_cannot_be_read_never_looks_stalled_nor_raises() -> None:
    bare = SimpleNamespace()
    assert recovery_progress(bare) != recovery_progress(bare)
    assert "while describing" in describe_rebalance(bare)
    rig = Rig()
    rig.rebalancing = True
    rig.watch.progress = lambda: recovery_progress(bare)
    assert not any(rig.run(60))


def test_a_failed_rejoin_request_is_logged_and_asked_again_later() -> None:
    rig = Rig()
    rig.rebalancing = True

    def refuse() -> None:
        raise RuntimeError("consumer not started")

    rig.watch.rejoin = refuse
    assert rig.run(9)[-1] is True  # the first tick starts the wait
    assert rig.run(8)[-1] is True and rig.watch.rejoins == 2
