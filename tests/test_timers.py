"""Shared deadlines on one timer, with a clock turned by hand."""

from twisted.internet.task import Clock

from l4router.timers import Deadlines


def test_deadlines_fire_in_order_at_most_an_eighth_late_and_removed_ones_never():
    clock = Clock()
    deadlines = Deadlines(clock, 8.0)
    fired = []
    deadlines.add("a", lambda: fired.append(("a", clock.seconds())))
    clock.advance(3)
    deadlines.add("b", lambda: fired.append(("b", clock.seconds())))
    deadlines.add("gone", lambda: fired.append(("gone", clock.seconds())))
    deadlines.remove("gone")
    clock.advance(5)
    assert fired == [("a", 8.0)]
    clock.advance(2.9)
    assert fired == [("a", 8.0)]
    clock.advance(0.1)  # b's deadline (11) passed at the next look: at most 1 s (8/8) late
    assert fired == [("a", 8.0), ("b", 11.0)]
    assert not deadlines.pending and not clock.getDelayedCalls()


def test_a_deadline_added_again_moves_to_the_end_and_the_timer_is_one_call():
    clock = Clock()
    deadlines = Deadlines(clock, 4.0)
    fired = []
    for owner in range(100):
        deadlines.add(owner, lambda owner=owner: fired.append(owner))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2)
    deadlines.add(0, lambda: fired.append("0 again"))  # a retry: a new deadline, at 6
    clock.advance(2)
    assert fired == list(range(1, 100))
    clock.advance(2)
    assert fired[-1] == "0 again"
