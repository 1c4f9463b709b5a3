"""FakeComfyUI behaviour beyond the recordings: interrupts, queue edits, history, /api/jobs,
failures, video and two-pass progress, models, versions, and shutdown — over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fixtures_util import Client, Frame, serve
from websockets.exceptions import ConnectionClosed

from tower_progress.simulate import workflows
from tower_progress.simulate.server import FakeComfyUI

GIB = 1 << 30


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[FakeComfyUI, str, aiohttp.ClientSession]]:
    """A served simulator and a session on it; the test body must finish within 20 s."""
    sim = FakeComfyUI(seed=3, **options)
    async with asyncio.timeout(20), serve(sim) as base, aiohttp.ClientSession(base) as http:
        yield sim, base, http


async def post(http: aiohttp.ClientSession, path: str, body: Any = None) -> Any:
    async with http.post(path, json=body) as response:
        text = await response.text()
        assert response.status == 200, text
        return await response.json() if text else None


async def submit(http: aiohttp.ClientSession, graph: Any, client_id: str | None = None) -> str:
    body: dict[str, Any] = {"prompt": graph}
    if client_id is not None:
        body["client_id"] = client_id
    answer = await post(http, "/prompt", body)
    prompt_id: str = answer["prompt_id"]
    return prompt_id


async def get(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as response:
        assert response.status == status
        return await response.json()


def is_(kind: str, **fields: Any) -> Any:
    return lambda f: f.type == kind and all(f.data.get(k) == v for k, v in fields.items())


def finished(prompt_id: str) -> Any:
    return is_("executing", node=None, prompt_id=prompt_id)


def texts(frames: list[Frame], prompt_id: str, *kinds: str) -> list[Frame]:
    return [f for f in frames if f.type in kinds and f.data.get("prompt_id") == prompt_id]


def statuses(frames: list[Frame]) -> list[int]:
    return [f.data["status"]["exec_info"]["queue_remaining"] for f in frames if f.type == "status"]


def events(sim: FakeComfyUI, prompt_id: str) -> list[str]:
    return [t.event for t in sim.history_log if t.prompt_id == prompt_id]


async def test_a_targeted_interrupt_stops_only_its_prompt_at_the_next_step() -> None:
    async with running(step_seconds=0.2, load_seconds=0.01) as (sim, base, http):
        client = await Client.connect(base, "owner")
        long = await submit(http, workflows.still(steps=20, seed=1), "owner")
        short = await submit(http, workflows.still(steps=2, seed=2), "owner")
        await client.read_until(is_("progress", prompt_id=long, value=2))
        await post(http, "/interrupt", {"prompt_id": short})
        await client.read_until(is_("progress", prompt_id=long, value=3))
        await post(http, "/interrupt", {"prompt_id": long})
        await client.read_until(finished(short))
        await client.close()
        progress = [f.data["value"] for f in texts(client.frames, long, "progress")]
        assert progress == [1, 2, 3]
        [interrupted] = texts(client.frames, long, "execution_interrupted")
        assert (interrupted.data["node_id"], interrupted.data["node_type"]) == ("3", "KSampler")
        assert events(sim, long) == ["queued", "started", "interrupted"]
        assert events(sim, short) == ["queued", "started", "completed"]
        entry = (await get(http, f"/history/{long}"))[long]
        assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        assert (await get(http, f"/api/jobs/{long}"))["status"] == "failed"


async def test_an_interrupt_lands_on_the_next_node_and_is_lost_in_the_last_one() -> None:
    async with running(step_seconds=0.01, load_seconds=0.01, frame_seconds=0.1) as (
        sim,
        base,
        http,
    ):
        client = await Client.connect(base, "owner")
        graph = workflows.still(steps=1, batch=4)
        between = await submit(http, graph, "owner")
        await client.read_until(is_("executing", node="8", prompt_id=between))
        await post(http, "/interrupt")
        await client.read_until(finished(between))
        [interrupted] = texts(client.frames, between, "execution_interrupted")
        assert (interrupted.data["node_id"], interrupted.data["node_type"]) == ("9", "SaveImage")

        graph["3"]["inputs"]["seed"] = 7
        last = await submit(http, graph, "owner")
        await client.read_until(is_("executing", node="9", prompt_id=last))
        await post(http, "/interrupt")
        await client.read_until(finished(last))
        after = await submit(http, workflows.still(steps=1, seed=8), "owner")
        await client.read_until(finished(after))
        await client.close()
        assert events(sim, last)[-1] == "completed"
        assert events(sim, after)[-1] == "completed"


async def test_queue_delete_and_clear_drop_waiting_prompts_and_broadcast_status() -> None:
    async with running(step_seconds=0.2, load_seconds=0.01) as (sim, base, http):
        watcher = await Client.connect(base, "watcher")
        owner = await Client.connect(base, "owner")
        busy = await submit(http, workflows.still(steps=20, seed=1), "owner")
        await owner.read_until(is_("execution_start", prompt_id=busy))
        waiting = [await submit(http, workflows.still(seed=n)) for n in (2, 3, 4)]
        await post(http, "/queue", {"delete": [waiting[1], "not-a-prompt"]})
        queue = await get(http, "/queue")
        assert sorted(item[1] for item in queue["queue_pending"]) == sorted(
            [waiting[0], waiting[2]]
        )
        assert [item[1] for item in queue["queue_running"]] == [busy]
        await post(http, "/queue", {"clear": True})
        lone = await submit(http, workflows.still(seed=5))
        await post(http, "/queue", {"delete": [lone]})
        await post(http, "/interrupt", {"prompt_id": busy})
        await owner.read_until(finished(busy))
        await sim.flush()
        frames = await watcher.drain()
        assert statuses(frames) == [0, 1, 1, 2, 3, 4, 3, 1, 2, 1, 1, 0]
        for prompt_id in [*waiting, lone]:
            assert events(sim, prompt_id) == ["queued", "deleted"]
            assert await get(http, f"/history/{prompt_id}") == {}
            assert await get(http, f"/api/jobs/{prompt_id}", 404) == {"error": "Job not found"}
        await watcher.close()
        await owner.close()


async def test_queue_pending_is_the_raw_heap_and_runs_in_number_order() -> None:
    async with running(step_seconds=0.2, load_seconds=0.01) as (sim, base, http):
        owner = await Client.connect(base, "owner")
        busy = await submit(http, workflows.still(steps=20, seed=1), "owner")
        await owner.read_until(is_("execution_start", prompt_id=busy))
        bodies: list[dict[str, Any]] = [
            {"prompt": workflows.still(steps=1, seed=2), "client_id": "owner"},
            {"prompt": workflows.still(steps=1, seed=3), "front": True},
            {"prompt": workflows.still(steps=1, seed=4), "number": 0.5},
            {"prompt": workflows.still(steps=1, seed=5)},
        ]
        answers = [await post(http, "/prompt", body) for body in bodies]
        assert [a["number"] for a in answers] == [1, -2, 0.5, 3]
        heap: list[tuple[float, str]] = []
        for answer in answers:
            heapq.heappush(heap, (answer["number"], answer["prompt_id"]))
        pending = (await get(http, "/queue"))["queue_pending"]
        assert [(item[0], item[1]) for item in pending] == heap
        assert all(len(item) == 5 and item[4] == ["9"] for item in pending)
        extra = {item[1]: sorted(item[3]) for item in pending}
        assert extra[answers[0]["prompt_id"]] == ["client_id", "create_time"]
        assert extra[answers[1]["prompt_id"]] == ["create_time"]
        await post(http, "/interrupt")
        await owner.read_until(finished(answers[0]["prompt_id"]))
        await sim.flush()
        await owner.close()
        started = [t.prompt_id for t in sim.history_log if t.event == "started"]
        assert started[1:3] == [answers[1]["prompt_id"], answers[2]["prompt_id"]]
        assert started[3] == answers[0]["prompt_id"]


async def test_history_lists_the_newest_entries_and_can_be_deleted_and_cleared() -> None:
    async with running(speed=0.01) as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        ids = []
        for seed in (1, 2, 3):
            ids.append(await submit(http, workflows.still(steps=1, seed=seed), "owner"))
            await owner.read_until(finished(ids[-1]))
        await owner.close()
        assert list(await get(http, "/history?max_items=2")) == ids[1:]
        assert list(await get(http, "/history?max_items=1&offset=0")) == ids[:1]
        assert list(await get(http, "/api/history")) == ids
        async with http.get("/history?max_items=two") as response:
            assert response.status == 400
            assert "max_items" in (await response.json())["error"]
        await post(http, "/history", {"delete": [ids[0]]})
        assert await get(http, f"/history/{ids[0]}") == {}
        await post(http, "/history", {"clear": True})
        assert await get(http, "/history") == {}


async def test_jobs_api_filters_sorts_pages_and_rejects_bad_queries() -> None:
    async with running(speed=0.01) as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        graphs = [
            workflows.still(steps=1, seed=1),
            workflows.failing(steps=1),
            workflows.still(seed=2),
        ]
        ids = []
        for graph in graphs:
            ids.append(await submit(http, graph, "owner"))
            await owner.read_until(finished(ids[-1]))
        await owner.close()
        failed = await get(http, "/api/jobs?status=failed")
        assert [job["id"] for job in failed["jobs"]] == [ids[1]]
        assert failed["jobs"][0]["execution_error"]["node_type"] == "ImageUpscaleWithModel"
        page = await get(http, "/api/api/jobs?sort_order=asc&limit=1&offset=1")
        assert [job["id"] for job in page["jobs"]] == [ids[1]]
        assert page["pagination"] == {"offset": 1, "limit": 1, "total": 3, "has_more": True}
        job = await get(http, f"/api/jobs/{ids[0]}")
        assert job["preview_output"] == {
            "filename": "still_00001_.png",
            "subfolder": "",
            "type": "output",
            "nodeId": "9",
            "mediaType": "images",
        }
        for query in ("status=done", "sort_by=speed", "limit=-1", "offset=x"):
            async with http.get(f"/api/jobs?{query}") as response:
                assert response.status == 400
                assert (await response.json())["error"].startswith("Invalid")


async def test_node_failures_are_reported_like_comfyui() -> None:
    async with running(speed=0.01) as (sim, base, http):
        owner = await Client.connect(base, "owner")
        failing = await submit(http, workflows.failing(steps=2), "owner")
        await owner.read_until(finished(failing))
        [error] = texts(owner.frames, failing, "execution_error")
        assert error.data["node_id"] == "10"
        assert error.data["node_type"] == "ImageUpscaleWithModel"
        assert error.data["exception_type"] == "RuntimeError"
        assert error.data["executed"] == ["11", "4", "5", "7", "6", "3", "8"]
        assert set(error.data["current_inputs"]) == {"upscale_model", "image", "fail"}
        assert error.data["exception_message"].endswith("\n")
        assert not texts(owner.frames, failing, "execution_success", "executed")

        video = workflows.video(frames=9, steps=1, width=64, height=64)
        video["8"]["inputs"]["fail_at_frame"] = 5
        oom = await submit(http, video, "owner")
        await owner.read_until(finished(oom))
        await owner.close()
        [error] = texts(owner.frames, oom, "execution_error")
        assert error.data["exception_type"] == "torch.OutOfMemoryError"
        assert "ran out of memory" in error.data["exception_message"]
        decoded = [
            f.data["value"] for f in texts(owner.frames, oom, "progress") if f.data["node"] == "8"
        ]
        assert decoded == [1, 2, 3, 4]
        stats = await get(http, "/system_stats")
        assert stats["devices"][0]["torch_vram_total"] == 0
        assert events(sim, oom)[-1] == "failed"


async def test_video_frames_and_two_pass_steps_are_reported_as_comfyui_does() -> None:
    async with running(speed=0.01) as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        clip = await submit(http, workflows.video(frames=16, steps=2, width=64, height=64), "owner")
        webm = await submit(
            http, workflows.video(frames=17, steps=1, width=64, height=64, output="webm"), "owner"
        )
        two_pass = await submit(http, workflows.two_pass(steps=6, refiner_steps=2), "owner")
        await owner.read_until(finished(two_pass))
        await owner.close()

        def ticks(prompt_id: str, node: str) -> list[tuple[int, int]]:
            progress = texts(owner.frames, prompt_id, "progress")
            return [(f.data["value"], f.data["max"]) for f in progress if f.data["node"] == node]

        assert ticks(clip, "8") == [(n, 13) for n in range(1, 14)]
        assert ticks(clip, "50") == [(n, 13) for n in range(1, 14)]
        [combined] = texts(owner.frames, clip, "executed")
        [gif] = combined.data["output"]["gifs"]
        assert (gif["filename"], gif["format"], gif["frame_rate"]) == (
            "video_00001.mp4",
            "video/h264-mp4",
            16.0,
        )
        assert ticks(webm, "8") == [(n, 17) for n in range(1, 18)]
        [saved] = texts(owner.frames, webm, "executed")
        assert saved.data["output"] == {
            "images": [{"filename": "video_00002_.webm", "subfolder": "", "type": "output"}],
            "animated": [True],
        }
        assert ticks(two_pass, "10") == [(n, 6) for n in range(1, 5)]
        assert ticks(two_pass, "11") == [(n, 6) for n in range(1, 3)]


async def test_models_stay_loaded_until_freed_and_previews_follow_the_preview_method() -> None:
    async with running(speed=0.01, preview_method="none") as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        first = await submit(http, workflows.still(steps=2, ckpt="a.safetensors"), "owner")
        await owner.read_until(finished(first))
        second = await post(
            http,
            "/prompt",
            {
                "prompt": workflows.still(steps=2, ckpt="b.safetensors"),
                "client_id": "owner",
                "extra_data": {"preview_method": "auto"},
            },
        )
        await owner.read_until(finished(second["prompt_id"]))
        await owner.close()
        previews = [f for f in owner.frames if f.event is not None]
        assert len(previews) == 2
        stats = await get(http, "/system_stats")
        assert stats["devices"][0]["torch_vram_total"] == 2 * int(6.5 * GIB)
        await post(http, "/free", {"unload_models": True, "free_memory": False})
        stats = await get(http, "/system_stats")
        assert stats["devices"][0]["torch_vram_total"] == 0


async def test_rejected_prompts_get_comfyuis_400_bodies_and_still_use_a_number() -> None:
    async with running(speed=0.01) as (_sim, _base, http):
        unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
        async with http.post("/prompt", json={"prompt": unknown}) as response:
            assert response.status == 400
            assert await response.json() == {
                "error": {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because node NoSuchNode does not exist.",
                    "details": "Node ID '#1'",
                    "extra_info": {},
                },
                "node_errors": {},
            }
        no_output = {"5": workflows.still()["5"]}
        async with http.post("/prompt", json={"prompt": no_output}) as response:
            assert (await response.json())["error"]["type"] == "prompt_no_outputs"
        missing = workflows.still()
        del missing["3"]["inputs"]["steps"]
        async with http.post("/prompt", json={"prompt": missing}) as response:
            body = await response.json()
            [problem] = body["node_errors"]["3"]["errors"]
            assert problem == {
                "type": "required_input_missing",
                "message": "Required input is missing",
                "details": "steps",
                "extra_info": {"input_name": "steps"},
            }
        cyclic = workflows.still()
        cyclic["3"]["inputs"]["latent_image"] = ["3", 0]
        async with http.post("/prompt", json={"prompt": cyclic}) as response:
            [problem] = (await response.json())["node_errors"]["9"]["errors"]
            assert problem["type"] == "exception_during_validation"
            assert problem["extra_info"]["exception_type"] == "RecursionError"
        async with http.post("/prompt", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_prompt"
        partly = workflows.still(steps=1)
        partly["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
        answer = await post(http, "/prompt", {"prompt": partly})
        assert answer["number"] == 4
        assert answer["node_errors"]["20"]["errors"][0]["type"] == "exception_during_validation"
        queued = await get(http, "/queue")
        [item] = queued["queue_pending"] + queued["queue_running"]
        assert item[4] == ["9"]


async def test_an_old_version_behaves_like_old_comfyui() -> None:
    async with running(speed=0.01, version="0.3.40") as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        await owner.ws.send(
            '{"type": "feature_flags", "data": {"supports_preview_metadata": true}}'
        )
        prompt_id = await submit(http, workflows.still(steps=2), "owner")
        await owner.read_until(finished(prompt_id))
        await owner.close()
        kinds = {f.type for f in owner.frames} | {f.event for f in owner.frames}
        assert "progress_state" not in kinds and "feature_flags" not in kinds
        assert 1 in kinds and 4 not in kinds
        entry = (await get(http, f"/history/{prompt_id}"))[prompt_id]
        assert entry["prompt"][3] == {"client_id": "owner"}
        assert (await get(http, "/system_stats"))["system"]["os"] == "posix"
        async with http.get("/api/jobs") as response:
            assert response.status == 404


@pytest.mark.parametrize(
    ("version", "client_id", "kept"),
    [("0.8.0", None, False), ("0.8.0", "owner", True), ("0.3.64", None, True)],
    ids=["0.8.0-no-client-id", "0.8.0-client-id", "0.3.64-no-client-id"],
)
async def test_a_cached_output_reaches_history_as_in_that_comfyui_version(
    version: str, client_id: str | None, kept: bool
) -> None:
    async with running(speed=0.01, version=version) as (_sim, base, http):
        owner = await Client.connect(base, "owner")
        graph = workflows.still(steps=2)
        first = await submit(http, graph, "owner")
        await owner.read_until(finished(first))
        rerun = await submit(http, graph, client_id)
        await owner.read_until(is_("status", status={"exec_info": {"queue_remaining": 0}}))
        await owner.close()
        entries = await get(http, "/history")
        cached = entries[rerun]["status"]["messages"][1]
        assert (cached[0], sorted(cached[1]["nodes"])) == ("execution_cached", sorted(graph))
        outputs, meta = entries[first]["outputs"], entries[first]["meta"]
        assert (entries[rerun]["outputs"], entries[rerun]["meta"]) == (
            (outputs, meta) if kept else ({}, {})
        )
        if version == "0.8.0":
            job = await get(http, f"/api/jobs/{rerun}")
            assert job["outputs_count"] == (1 if kept else 0)


async def test_a_foreign_origin_is_refused_and_every_route_has_an_api_alias() -> None:
    async with running(speed=0.01) as (_sim, base, http):
        async with http.get("/queue", headers={"Origin": "http://evil.example"}) as response:
            assert response.status == 403
        async with http.get("/api/queue", headers={"Origin": base}) as response:
            assert await response.json() == {"queue_running": [], "queue_pending": []}
        assert await get(http, "/api/prompt") == {"exec_info": {"queue_remaining": 0}}
        assert (await get(http, "/api/features"))["supports_preview_metadata"] is True


async def test_close_ends_every_socket_even_one_orphaned_by_a_duplicate_id() -> None:
    sim = FakeComfyUI(speed=0.01)
    async with serve(sim) as base:
        older = await Client.connect(base, "same")
        newer = await Client.connect(base, "same")
        other = await Client.connect(base, None)
        await older.close()
        await sim.close()
        for client in (newer, other):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.read()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: workflows.still(steps=0), "steps must be between 1 and 10000, got 0"),
        (lambda: workflows.video(frames=0), "frames must be between 1 and 16384, got 0"),
        (lambda: workflows.two_pass(steps=6, refiner_steps=6), "refiner_steps must be between"),
        (lambda: workflows.failing(width=8), "width must be between 16 and 16384, got 8"),
    ],
)
def test_workflow_builders_refuse_impossible_settings(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
