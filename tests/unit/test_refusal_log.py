"""Unauthenticated refusals in the log (issue 19, 7): a flood of them costs one line a second, not one each.

Pure logic: ``RefusalLog`` is fed times directly, and ``Records.refuse`` is called as the trust middleware
calls it.
"""

from __future__ import annotations

import structlog

from quorum_node.control.recorder import Records
from quorum_node.records import Draft, RefusalLog


def test_a_flood_is_one_line_a_second_carrying_how_many_were_passed_over() -> None:
    sampler = RefusalLog(interval_s=1.0)
    lines = [(t / 1000, passed) for t in range(10_000) if (passed := sampler.take(t / 1000)) is not None]
    assert len(lines) == 10  # 10,000 refusals over 10 s
    assert lines[0] == (0.0, 0) and all(passed == 999 for _, passed in lines[1:])
    assert sampler.take(60.0) == 999  # the first after a quiet spell is logged at once, with the rest's count
    assert sampler.take(60.5) is None and sampler.take(61.0) == 1


def test_a_refused_request_is_counted_and_sealed_without_a_record() -> None:
    records = Records()
    seen: list[object] = []
    reasons: list[str] = []
    records.add(seen.append)
    records.add_refusal(reasons.append)
    drafts = [
        Draft(
            request_id=f"r{i}",
            node="n",
            method="GET",
            path="/v1/models",
            surface=None,
            operation=None,
            remote="192.0.2.7",
        )
        for i in range(5)
    ]
    with structlog.testing.capture_logs() as logs:
        for i, d in enumerate(drafts):
            records.refuse(d, "missing_key", now=100.0 + i / 10)
    assert reasons == ["missing_key"] * 5
    assert all(d.sealed is not None for d in drafts)  # so the middleware does not record them
    assert [records.seal_nowait(d, 401) for d in drafts] == [None] * 5 and seen == []
    assert [(e["event"], e["remote"], e["passed_over"]) for e in logs] == [("unauthenticated_request", "192.0.2.7", 0)]
