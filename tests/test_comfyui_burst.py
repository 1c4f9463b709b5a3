"""ProgressBurst over plain messages: what waits, what goes on, in which order."""

from __future__ import annotations

from typing import Any

from tower_progress.core.model import ComfyMessage
from tower_progress.sources.comfyui_burst import ProgressBurst

P, Q = "p1", "p2"


def msg(kind: str, **data: Any) -> ComfyMessage:
    return ComfyMessage("box", {"type": kind, "data": data})


def progress(value: int, node: str = "3", prompt_id: str = P, maximum: int = 20) -> ComfyMessage:
    return msg("progress", value=value, max=maximum, node=node, prompt_id=prompt_id)


def state(value: int, prompt_id: str = P) -> ComfyMessage:
    node = {"value": value, "max": 20, "state": "running", "node_id": "3"}
    return msg("progress_state", nodes={"3": node}, prompt_id=prompt_id)


def test_a_sampling_burst_keeps_the_newest_of_each_kind_in_first_arrival_order() -> None:
    burst = ProgressBurst()
    for step in range(1, 6):
        assert burst.feed(progress(step)) == []
        assert burst.feed(state(step)) == []
        assert burst.feed(None) == []
        assert burst.waiting
    assert burst.drain() == [progress(5), state(5)]
    assert burst.drain() == []
    assert burst.waiting


def test_anything_else_releases_what_is_held_before_itself_and_ends_the_wait() -> None:
    burst = ProgressBurst()
    burst.feed(progress(7))
    burst.feed(state(7))
    executed = msg("executed", node="9", output={}, prompt_id=P)
    assert burst.feed(executed) == [progress(7), state(7), executed]
    assert not burst.waiting
    assert burst.feed(None) == []
    assert burst.feed(state(7)) == [state(7)]
    assert not burst.waiting


def test_the_last_step_of_a_node_goes_on_at_once() -> None:
    burst = ProgressBurst()
    burst.feed(progress(19))
    burst.feed(state(19))
    assert burst.feed(progress(20)) == [progress(20), state(19)]
    assert not burst.waiting


def test_each_prompt_and_node_keeps_its_own_newest_report() -> None:
    burst = ProgressBurst()
    for message in (progress(1), progress(1, node="12"), progress(2), progress(4, prompt_id=Q)):
        burst.feed(message)
    assert burst.drain() == [progress(2), progress(1, node="12"), progress(4, prompt_id=Q)]


def test_a_progress_without_prompt_id_or_node_is_held_like_any_other() -> None:
    burst = ProgressBurst()
    old = [msg("progress", value=v, max=8) for v in (1, 2, 3)]
    for message in old:
        assert burst.feed(message) == []
    assert burst.drain() == [old[-1]]


def test_without_coalescing_every_message_goes_on_as_it_comes() -> None:
    burst = ProgressBurst(coalesce=False)
    for message in (progress(1), state(1), progress(2)):
        assert burst.feed(message) == [message]
    assert burst.feed(None) == []
    assert burst.drain() == []
    assert not burst.waiting
