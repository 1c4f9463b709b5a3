"""ComfyUI API-format workflows with real node classes, as production systems submit them.

Each function returns a fresh graph ``{node_id: {"class_type", "inputs", "_meta"}}`` with
links as ``[node_id, output_index]``, ready for ``POST /prompt``. Node ids follow ComfyUI's
default workflows (3 sampler, 4 checkpoint, 5 latent, 6/7 prompts, 8 decode, 9 save).
Nothing here carries timing: the simulator's cost table decides how long each class takes.
``failing`` adds ``"fail": true`` to its upscaler, a fault knob the simulator honours and a
real ComfyUI ignores (unknown inputs are dropped), so the same graph is valid on both.
"""

from __future__ import annotations

from typing import Any, Literal

Graph = dict[str, dict[str, Any]]
VideoOutput = Literal["vhs", "webm", "webp"]

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_BASE = "sd_xl_base_1.0.safetensors"
SDXL_REFINER = "sd_xl_refiner_1.0.safetensors"
WAN_UNET = "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"
WAN_CLIP = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
UPSCALER = "4x-UltraSharp.pth"
POSITIVE = "a lighthouse on a cliff at dusk, volumetric light, highly detailed"
NEGATIVE = "blurry, low quality, watermark, text"


def _node(class_type: str, title: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def _ksampler(
    model: str, latent: str, *, seed: int, steps: int, cfg: float, sampler: str, scheduler: str
) -> dict[str, Any]:
    """A KSampler conditioned on nodes 6 (positive) and 7 (negative)."""
    return _node(
        "KSampler",
        "KSampler",
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler,
        scheduler=scheduler,
        denoise=1.0,
        model=[model, 0],
        positive=["6", 0],
        negative=["7", 0],
        latent_image=[latent, 0],
    )


def _check(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _size(width: int, height: int) -> None:
    _check("width", width, 16, 16384)
    _check("height", height, 16, 16384)


def still(
    steps: int = 20,
    width: int = 512,
    height: int = 512,
    batch: int = 1,
    ckpt: str = SD15,
    *,
    seed: int = 0,
    positive: str = POSITIVE,
    prefix: str = "still",
) -> Graph:
    """Text to image: checkpoint, two prompts, empty latent, KSampler, VAEDecode, SaveImage."""
    _check("steps", steps, 1, 10000)
    _check("batch", batch, 1, 4096)
    _size(width, height)
    return {
        "4": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=ckpt),
        "6": _node("CLIPTextEncode", "CLIP Text Encode (Prompt)", text=positive, clip=["4", 1]),
        "7": _node("CLIPTextEncode", "CLIP Text Encode (Negative)", text=NEGATIVE, clip=["4", 1]),
        "5": _node(
            "EmptyLatentImage", "Empty Latent Image", width=width, height=height, batch_size=batch
        ),
        "3": _ksampler(
            "4", "5", seed=seed, steps=steps, cfg=7.0, sampler="euler", scheduler="normal"
        ),
        "8": _node("VAEDecode", "VAE Decode", samples=["3", 0], vae=["4", 2]),
        "9": _node("SaveImage", "Save Image", filename_prefix=prefix, images=["8", 0]),
    }


def video(
    frames: int = 33,
    steps: int = 20,
    width: int = 832,
    height: int = 480,
    *,
    seed: int = 0,
    fps: float = 16.0,
    output: VideoOutput = "vhs",
    positive: str = POSITIVE,
    prefix: str = "video",
) -> Graph:
    """Wan 2.1 text to video: UNET/CLIP/VAE loaders, EmptyHunyuanLatentVideo of ``frames``
    (``length``; ComfyUI decodes ``((frames - 1) // 4) * 4 + 1`` frames), KSampler, tiled VAE
    decode, then Video Helper Suite's VHS_VideoCombine, SaveWEBM or SaveAnimatedWEBP."""
    _check("frames", frames, 1, 16384)
    _check("steps", steps, 1, 10000)
    _size(width, height)
    graph: Graph = {
        "37": _node(
            "UNETLoader", "Load Diffusion Model", unet_name=WAN_UNET, weight_dtype="default"
        ),
        "38": _node("CLIPLoader", "Load CLIP", clip_name=WAN_CLIP, type="wan", device="default"),
        "39": _node("VAELoader", "Load VAE", vae_name=WAN_VAE),
        "48": _node("ModelSamplingSD3", "ModelSamplingSD3", shift=8.0, model=["37", 0]),
        "6": _node("CLIPTextEncode", "CLIP Text Encode (Positive)", text=positive, clip=["38", 0]),
        "7": _node("CLIPTextEncode", "CLIP Text Encode (Negative)", text=NEGATIVE, clip=["38", 0]),
        "40": _node(
            "EmptyHunyuanLatentVideo",
            "EmptyHunyuanLatentVideo",
            width=width,
            height=height,
            length=frames,
            batch_size=1,
        ),
        "3": _ksampler(
            "48", "40", seed=seed, steps=steps, cfg=6.0, sampler="uni_pc", scheduler="simple"
        ),
        "8": _node(
            "VAEDecodeTiled",
            "VAE Decode (Tiled)",
            samples=["3", 0],
            vae=["39", 0],
            tile_size=256,
            overlap=64,
            temporal_size=64,
            temporal_overlap=8,
        ),
    }
    if output == "vhs":
        graph["50"] = _node(
            "VHS_VideoCombine",
            "Video Combine",
            images=["8", 0],
            frame_rate=fps,
            loop_count=0,
            filename_prefix=prefix,
            format="video/h264-mp4",
            pingpong=False,
            save_output=True,
        )
    elif output == "webm":
        graph["50"] = _node(
            "SaveWEBM",
            "SaveWEBM",
            images=["8", 0],
            filename_prefix=prefix,
            codec="vp9",
            fps=fps,
            crf=32.0,
        )
    else:
        graph["50"] = _node(
            "SaveAnimatedWEBP",
            "SaveAnimatedWEBP",
            images=["8", 0],
            filename_prefix=prefix,
            fps=fps,
            lossless=False,
            quality=80,
            method="default",
        )
    return graph


def two_pass(
    steps: int = 30,
    refiner_steps: int = 6,
    width: int = 1024,
    height: int = 1024,
    *,
    seed: int = 0,
    positive: str = POSITIVE,
    prefix: str = "two_pass",
) -> Graph:
    """SDXL base + refiner: two KSamplerAdvanced over one schedule of ``steps`` steps, the
    base running steps 0..steps-refiner_steps, the refiner the rest (each reports ``max`` =
    ``steps`` and counts from 1, as ComfyUI does)."""
    _check("steps", steps, 2, 10000)
    _check("refiner_steps", refiner_steps, 1, steps - 1)
    _size(width, height)
    switch = steps - refiner_steps

    def sampler(title: str, model: str, pos: str, neg: str, latent: list[Any], **kw: Any) -> Any:
        return _node(
            "KSamplerAdvanced",
            title,
            noise_seed=seed,
            steps=steps,
            cfg=7.5,
            sampler_name="dpmpp_2m",
            scheduler="karras",
            model=[model, 0],
            positive=[pos, 0],
            negative=[neg, 0],
            latent_image=latent,
            **kw,
        )

    return {
        "4": _node("CheckpointLoaderSimple", "Load Checkpoint Base", ckpt_name=SDXL_BASE),
        "12": _node("CheckpointLoaderSimple", "Load Checkpoint Refiner", ckpt_name=SDXL_REFINER),
        "6": _node("CLIPTextEncode", "Positive (Base)", text=positive, clip=["4", 1]),
        "7": _node("CLIPTextEncode", "Negative (Base)", text=NEGATIVE, clip=["4", 1]),
        "15": _node("CLIPTextEncode", "Positive (Refiner)", text=positive, clip=["12", 1]),
        "16": _node("CLIPTextEncode", "Negative (Refiner)", text=NEGATIVE, clip=["12", 1]),
        "5": _node(
            "EmptyLatentImage", "Empty Latent Image", width=width, height=height, batch_size=1
        ),
        "10": sampler(
            "KSampler (Advanced) - BASE",
            "4",
            "6",
            "7",
            ["5", 0],
            add_noise="enable",
            start_at_step=0,
            end_at_step=switch,
            return_with_leftover_noise="enable",
        ),
        "11": sampler(
            "KSampler (Advanced) - REFINER",
            "12",
            "15",
            "16",
            ["10", 0],
            add_noise="disable",
            start_at_step=switch,
            end_at_step=10000,
            return_with_leftover_noise="disable",
        ),
        "17": _node("VAEDecode", "VAE Decode", samples=["11", 0], vae=["12", 2]),
        "19": _node("SaveImage", "Save Image", filename_prefix=prefix, images=["17", 0]),
    }


def failing(
    steps: int = 12,
    width: int = 512,
    height: int = 512,
    *,
    seed: int = 0,
    prefix: str = "failing",
) -> Graph:
    """A still whose ImageUpscaleWithModel (node 10, after sampling and decode) raises."""
    graph = still(steps, width, height, seed=seed, prefix=prefix)
    graph["11"] = _node("UpscaleModelLoader", "Load Upscale Model", model_name=UPSCALER)
    graph["10"] = _node(
        "ImageUpscaleWithModel",
        "Upscale Image (using Model)",
        upscale_model=["11", 0],
        image=["8", 0],
        fail=True,
    )
    graph["9"]["inputs"]["images"] = ["10", 0]
    return graph


def decoded_frames(length: int, temporal_factor: int = 4) -> int:
    """Frames a video latent of ``length`` decodes to: ``((length - 1) // k) * k + 1``."""
    return ((length - 1) // temporal_factor) * temporal_factor + 1
