"""Stage table, frame counting and workflow weights over plain graphs."""

from __future__ import annotations

from typing import Any

import pytest

from tower_progress.core.frames import frames_in_output, frames_total, output_files, resolve_int
from tower_progress.core.model import Stage
from tower_progress.core.stages import stage_of
from tower_progress.core.workflow import Workflow


@pytest.mark.parametrize(
    ("class_type", "stage"),
    [
        ("CheckpointLoaderSimple", Stage.LOADING),
        ("ADE_AnimateDiffLoaderWithContext", Stage.LOADING),
        ("MyCustomModelLoader", Stage.LOADING),
        ("CLIPTextEncode", Stage.PREPARING),
        ("SomePackTextEncodeXL", Stage.PREPARING),
        ("EmptyHunyuanLatentVideo", Stage.PREPARING),
        ("EmptyFancyLatent", Stage.PREPARING),
        ("KSamplerSelect", Stage.PREPARING),
        ("KSampler", Stage.SAMPLING),
        ("KSamplerAdvanced", Stage.SAMPLING),
        ("SamplerCustomAdvanced", Stage.SAMPLING),
        ("WanVideoSampler", Stage.SAMPLING),
        ("KSamplerEfficient", Stage.SAMPLING),
        ("VAEDecodeTiled", Stage.DECODING),
        ("HyVideoDecode", Stage.DECODING),
        ("MyVideoDecodeFast", Stage.DECODING),
        ("VHS_VideoCombine", Stage.ENCODING),
        ("SaveAnimatedWEBP", Stage.ENCODING),
        ("SaveVideo", Stage.ENCODING),
        ("SaveSomethingElse", Stage.ENCODING),
        ("FancyVideoCombineV2", Stage.ENCODING),
        ("ImageBlur", Stage.PROCESSING),
        ("UnknownNode123", Stage.PROCESSING),
    ],
)
def test_stage_table(class_type: str, stage: Stage) -> None:
    assert stage_of(class_type) is stage


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


@pytest.mark.parametrize(
    ("graph", "frames"),
    [
        ({"5": node("EmptyLatentImage", batch_size=16)}, 16),
        ({"5": node("EmptyHunyuanLatentVideo", length=121, batch_size=1)}, 121),
        ({"5": node("EmptyHunyuanLatentVideo", length=120, batch_size=2)}, 234),
        ({"5": node("EmptyLTXVLatentVideo", length=97)}, 97),
        ({"5": node("EmptyMochiLatentVideo", length=30)}, 25),
        ({"5": node("WanVideoEmptyEmbeds", num_frames=81)}, 81),
        ({"5": node("MyVideoLatent", frame_count=48)}, 48),
        ({"5": node("ImageBlur", length=48)}, None),
        (
            {
                "5": node("EmptyLatentImage", batch_size=["7", 0]),
                "7": node("PrimitiveInt", value=4),
            },
            4,
        ),
        ({"5": node("EmptyLatentImage", batch_size=["7", 0]), "7": node("Broken")}, None),
        ({"5": node("EmptyLatentImage", batch_size=0)}, None),
        ({"5": node("EmptyLatentImage", batch_size=10**9)}, None),
        ({"5": node("EmptyLatentImage", batch_size=True)}, None),
        ({"5": node("EmptyLatentImage", batch_size=8.0)}, 8),
        ({"5": "not a node", "6": {"class_type": 3}}, None),
        (
            {
                "5": node("EmptyLatentImage", batch_size=2),
                "6": node("EmptyLatentImage", batch_size=3),
            },
            3,
        ),
    ],
)
def test_frames_total(graph: dict[str, Any], frames: int | None) -> None:
    assert frames_total(graph) == frames


CHAIN = {
    "9": node("VHS_VideoCombine", images=["8", 0], frame_rate=16),
    "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
    "3": node("KSampler", steps=20, latent_image=["5", 0], model=["4", 0]),
    "4": node("CheckpointLoaderSimple", ckpt_name="a.safetensors"),
}


@pytest.mark.parametrize(
    ("source", "extra", "frames"),
    [
        (node("EmptyLatentImage", width=512, height=512, batch_size=12), {}, 12),
        (node("EmptyHunyuanLatentVideo", length=49, batch_size=1), {}, 49),
        (node("EmptyHunyuanLatentVideo", length=50, batch_size=1), {}, 49),
        (
            node("EmptyHunyuanLatentVideo", length=["7", 0], batch_size=1),
            {"7": node("PrimitiveInt", value=33)},
            33,
        ),
        (
            node("EmptyHunyuanLatentVideo", length=["7", 0], batch_size=2),
            {"7": node("PrimitiveInt", value=["6", 0]), "6": node("PrimitiveInt", value=33)},
            66,
        ),
        (
            node("EmptyLatentImage", batch_size=["7", 0]),
            {
                "7": node("SimpleMath+", value="a*b", a=["6", 0], b=2),
                "6": node("PrimitiveInt", value=3),
            },
            None,
        ),
        (
            node("WanImageToVideo", length=["7", 0], batch_size=1),
            {"7": node("MathExpression|pysssss", expression="a + 1", a=80)},
            None,
        ),
        (
            node("EmptyLatentImage", batch_size=["7", 0]),
            {"7": node("IntMath", value=4, b=3, operation="multiply")},
            None,
        ),
        (
            node("EmptyLatentImage", batch_size=["7", 0]),
            {"7": node("PrimitiveInt", value=4, control_after_generate="fixed")},
            4,
        ),
        (
            node("EmptyLatentImage", batch_size=4),
            {"8": node("VAEDecode", samples=["6", 0]), "6": node("RepeatLatentBatch", amount=3)},
            None,
        ),
        (
            node("EmptyHunyuanLatentVideo", length=49, batch_size=1),
            {"10": node("VHS_SelectEveryNthImage", images=["8", 0], select_every_nth=2)},
            None,
        ),
    ],
    ids=[
        "batch through sampler and decoder",
        "hunyuan length 4k+1",
        "hunyuan length 50 decodes 49",
        "length from PrimitiveInt",
        "primitive of a primitive, batch multiplies",
        "batch from a math node: unknown",
        "length from an expression node: unknown",
        "a numeric value beside operands: unknown",
        "a primitive with its widget settings",
        "a repeated latent batch: unknown",
        "every nth frame selected: unknown",
    ],
)
def test_frames_total_of_a_chain_to_the_writer(
    source: dict[str, Any], extra: dict[str, Any], frames: int | None
) -> None:
    assert frames_total({**CHAIN, "5": source, **extra}) == frames
    assert Workflow.from_graph({**CHAIN, "5": source, **extra}).frames_total == frames


def test_link_cycles_are_bounded() -> None:
    graph = {"1": node("PrimitiveInt", value=["2", 0]), "2": node("PrimitiveInt", value=["1", 0])}
    assert resolve_int(graph, ["1", 0]) is None


@pytest.mark.parametrize(
    ("output", "per_video", "frames"),
    [
        ({"images": [{"filename": "a.png", "type": "output"}] * 3}, 16, 3),
        ({"images": [{"filename": "a.webp", "type": "output"}], "animated": [True]}, 16, 16),
        ({"images": [{"filename": "a.webp", "type": "output"}], "animated": [True]}, None, None),
        ({"gifs": [{"filename": "v.mp4", "type": "output"}]}, 81, 81),
        ({"images": [{"filename": "p.png", "type": "temp"}]}, 16, None),
        ({"images": "nonsense"}, 16, None),
        ({"text": ["hello"]}, 16, None),
        (None, 16, None),
    ],
)
def test_frames_in_output(output: Any, per_video: int | None, frames: int | None) -> None:
    assert frames_in_output(output, per_video) == frames


def test_output_files_skip_previews_and_garbage() -> None:
    output = {
        "images": [{"filename": "a.png", "type": "output"}, {"filename": "t.png", "type": "temp"}],
        "gifs": [{"filename": "v.mp4", "type": "output"}, "junk"],
    }
    assert output_files(output) == ["a.png", "v.mp4"]
    assert output_files("junk") == []


TWO_PASS = {
    "4": node("CheckpointLoaderSimple", ckpt_name="sdxl.safetensors"),
    "5": node("EmptyLatentImage", batch_size=1, width=1024, height=1024),
    "10": node("KSamplerAdvanced", steps=30, end_at_step=24),
    "11": node("KSamplerAdvanced", steps=10),
    "8": node("VAEDecode"),
    "9": node("SaveImage"),
    "bad": {"inputs": {}},
}


@pytest.mark.parametrize(
    ("class_type", "stage"),
    [
        *[
            (name, Stage.LOADING)
            for name in [
                "CheckpointLoaderSimple",
                "UNETLoader",
                "CLIPLoader",
                "DualCLIPLoader",
                "VAELoader",
                "LoraLoader",
                "ADE_AnimateDiffLoaderWithContext",
                "WanVideoModelLoader",
                "UpscaleModelLoader",
            ]
        ],
        *[
            (name, Stage.PREPARING)
            for name in [
                "CLIPTextEncode",
                "CLIPTextEncodeSDXL",
                "WanVideoTextEncode",
                "WanImageToVideo",
                "HunyuanImageToVideo",
                "EmptyHunyuanLatentVideo",
                "EmptyLTXVLatentVideo",
                "LTXVImgToVideo",
                "LTXVConditioning",
                "LTXVScheduler",
            ]
        ],
        *[
            (name, Stage.SAMPLING)
            for name in [
                "KSampler",
                "KSamplerAdvanced",
                "SamplerCustom",
                "SamplerCustomAdvanced",
                "WanVideoSampler",
                "HyVideoSampler",
            ]
        ],
        *[
            (name, Stage.DECODING)
            for name in ["VAEDecode", "VAEDecodeTiled", "WanVideoDecode", "HyVideoDecode"]
        ],
        *[
            (name, Stage.ENCODING)
            for name in [
                "SaveImage",
                "SaveAnimatedWEBP",
                "SaveAnimatedPNG",
                "SaveWEBM",
                "SaveVideo",
                "CreateVideo",
                "VHS_VideoCombine",
            ]
        ],
    ],
)
def test_every_node_class_the_stage_table_promises(class_type: str, stage: Stage) -> None:
    """Built-in loaders, encoders, samplers, decoders and writers, and the video packs'
    (AnimateDiff-Evolved, VideoHelperSuite, Wan, Hunyuan, LTX) by their real class names."""
    assert stage_of(class_type) is stage


def test_two_pass_sampling_is_one_job_split_by_steps_run() -> None:
    workflow = Workflow.from_graph(TWO_PASS)
    weights = workflow.weights()
    assert set(weights) == {"4", "5", "10", "11", "8", "9"}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert (workflow.nodes["10"].steps, workflow.nodes["11"].steps) == (24, 10)
    # default shares of the stages present (no processing node: 0.97 in all)
    assert weights["10"] == pytest.approx(0.65 / 0.97 * 24 / 34)
    assert weights["11"] == pytest.approx(0.65 / 0.97 * 10 / 34)
    assert weights["4"] == pytest.approx(0.15 / 0.97)


@pytest.mark.parametrize(
    ("inputs", "steps"),
    [
        ({"steps": 30, "start_at_step": 24, "end_at_step": 10000}, 6),
        ({"steps": 20, "start_at_step": 0, "end_at_step": 10}, 10),
        ({"steps": 20, "start_at_step": 20}, None),
        ({"steps": 20, "start_at_step": -3}, 20),
        ({"steps": "20"}, None),
    ],
)
def test_sampler_steps_are_the_steps_it_runs(inputs: dict[str, Any], steps: int | None) -> None:
    workflow = Workflow.from_graph({"3": node("KSamplerAdvanced", **inputs)})
    assert workflow.nodes["3"].steps == steps


HIRES_FIX = {
    "4": node("CheckpointLoaderSimple", ckpt_name="sd15.safetensors"),
    "5": node("EmptyLatentImage", batch_size=1, width=512, height=768),
    "3": node("KSampler", steps=30, latent_image=["5", 0]),
    "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
    "12": node("ImageScaleBy", image=["8", 0], upscale_method="lanczos", scale_by=1.5),
    "13": node("VAEEncode", pixels=["12", 0], vae=["4", 2]),
    "14": node("KSampler", steps=15, latent_image=["13", 0], denoise=0.5),
    "15": node("LatentUpscaleBy", samples=["14", 0], scale_by=2.0),
    "16": node("KSampler", steps=4, latent_image=["15", 0]),
    "17": node("LatentUpscale", samples=["16", 0], width=640, height=640),
    "18": node("KSampler", steps=2, latent_image=["17", 0]),
}


def test_samplers_are_weighted_by_steps_times_the_pixels_they_denoise() -> None:
    workflow = Workflow.from_graph(HIRES_FIX)
    base = 512 * 768 / 512**2
    work = {n: workflow.nodes[n].work for n in ("3", "14", "16", "18")}
    assert work == pytest.approx(
        {"3": 30 * base, "14": 15 * base * 2.25, "16": 4 * base * 9.0, "18": 2 * 640**2 / 512**2}
    )
    assert workflow.nodes["8"].work == 1.0
    weights = workflow.weights({"sampling": 1.0})
    assert weights["14"] / weights["3"] == pytest.approx(15 * 2.25 / 30)
    assert workflow.cost == pytest.approx(sum(work.values()))


@pytest.mark.parametrize(
    "latent",
    [
        ["99", 0],
        ["x", 0],
        ["loop", 0],
        "not a link",
    ],
)
def test_a_sampler_whose_latent_cannot_be_traced_uses_the_largest_size_in_the_graph(
    latent: Any,
) -> None:
    graph = {
        "x": "junk",
        "loop": node("LatentUpscaleBy", samples=["loop", 0], scale_by=2.0),
        "5": node("EmptyLatentImage", batch_size=1, width=1024, height=1024),
        "3": node("KSampler", steps=10, latent_image=latent),
    }
    assert Workflow.from_graph(graph).nodes["3"].work == 10 * 4.0


def test_prior_replaces_default_shares() -> None:
    workflow = Workflow.from_graph(TWO_PASS)
    weights = workflow.weights({"loading": 0.0, "sampling": 80.0, "decoding": 20.0})
    assert weights["4"] == 0.0
    assert weights["10"] + weights["11"] == pytest.approx(0.8)
    assert weights["8"] == pytest.approx(0.2)


def test_fingerprint_follows_cost_not_seed_or_prompt_text() -> None:
    base = Workflow.from_graph(TWO_PASS).fingerprint
    reseeded = {**TWO_PASS, "10": node("KSamplerAdvanced", steps=30, end_at_step=24, seed=9)}
    more_steps = {**TWO_PASS, "11": node("KSamplerAdvanced", steps=20)}
    assert Workflow.from_graph(reseeded).fingerprint == base
    assert Workflow.from_graph(more_steps).fingerprint != base


def test_sampler_with_invalid_steps_has_none() -> None:
    workflow = Workflow.from_graph({"3": node("KSampler", steps=0), "x": "junk"})
    assert workflow.nodes["3"].steps is None
    assert Workflow.from_graph("not a graph").nodes == {}


def test_cost_scales_with_steps_frames_and_pixels() -> None:
    still = {
        "5": node("EmptyLatentImage", batch_size=1, width=512, height=512),
        "3": node("KSampler", steps=20),
    }
    video = {
        "5": node("EmptyHunyuanLatentVideo", length=33, width=1024, height=512),
        "3": node("KSampler", steps=20),
    }
    assert Workflow.from_graph(still).cost == 20.0
    assert Workflow.from_graph(video).cost == 20.0 * 33 * 2
    assert Workflow.from_graph({}).cost == 1.0
