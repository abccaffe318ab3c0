"""The SPD control protocol (spdsim/protocol.py) that the simulator and the executor both drive."""
import pytest
from hypothesis import given, settings, strategies as st

from spdsim.protocol import SpdController


def test_pp_window_one_issues_only_known_tokens():
    ctl = SpdController(prompt_len=4, new_tokens=3, window=1)
    issue = ctl.issue()
    assert (issue.position, issue.epoch, issue.speculative) == (3, 0, False)
    assert not ctl.can_issue()                    # PP waits for the round trip
    v = ctl.on_result(3, 0, accept=lambda: pytest.fail("no draft was in flight"))
    assert (v.stale, v.accepted, v.committed) == (False, None, 1)
    assert v.marks() == [("commit", 4, None)]
    assert ctl.issue().position == 4


def test_spd_fills_the_window_with_drafts_and_a_rejection_restarts():
    ctl = SpdController(prompt_len=2, new_tokens=10, window=3)
    issued = [ctl.issue() for _ in range(3)]
    assert [i.position for i in issued] == [1, 2, 3]
    assert [i.speculative for i in issued] == [False, True, True]
    assert not ctl.can_issue()                    # n positions in flight
    v = ctl.on_result(1, 0, accept=lambda: True)
    assert v.accepted is True and v.marks() == [("verify", 2, True), ("commit", 2, None)]
    assert ctl.issue().position == 4
    v = ctl.on_result(2, 0, accept=lambda: False)
    assert v.marks() == [("verify", 3, False), ("flush", 2, None), ("commit", 3, None)]
    assert ctl.epoch == 1
    restart = ctl.issue()
    assert (restart.position, restart.epoch, restart.speculative) == (3, 1, False)
    # the old epoch's results for 3 and 4 are stale: dropped, nothing committed
    for p in (3, 4):
        stale = ctl.on_result(p, 0, accept=lambda: pytest.fail("stale results are not verified"))
        assert stale.stale and stale.marks() == [] and stale.committed == 2


def test_out_of_order_result_is_a_bug():
    ctl = SpdController(prompt_len=1, new_tokens=5, window=2)
    ctl.issue(), ctl.issue()
    with pytest.raises(RuntimeError):
        ctl.on_result(1, 0, accept=lambda: True)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), new_tokens=st.integers(1, 40),
       verdicts=st.lists(st.booleans(), min_size=1, max_size=64))
def test_lockstep_run_commits_exactly_new_tokens(n, new_tokens, verdicts):
    """Drive the controller like a lock-step pipeline: results come back n issues later, in order."""
    ctl = SpdController(prompt_len=3, new_tokens=new_tokens, window=n)
    in_flight, k, commits = [], 0, 0
    while not ctl.done:
        while ctl.can_issue():
            in_flight.append(ctl.issue())
        assert 1 <= sum(i.epoch == ctl.epoch for i in in_flight) <= n   # stale ones may linger
        head = in_flight.pop(0)
        v = ctl.on_result(head.position, head.epoch, accept=lambda: verdicts[k % len(verdicts)])
        if not v.stale:
            commits += 1
            if v.accepted is not None:
                k += 1
            if v.accepted is False:                   # everything else in flight is now stale
                assert all(i.position > head.position for i in in_flight)
    assert commits == new_tokens == ctl.committed
    assert ctl.next_position <= ctl.prompt_len + new_tokens - 1   # nothing past the last useful position
