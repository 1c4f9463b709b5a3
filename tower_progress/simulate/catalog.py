"""The node classes the fake ComfyUI knows, declared the way ComfyUI v0.8.0 declares them.

Each class has its inputs (widget types with the option dicts ComfyUI echoes back in
validation errors, or link types), its output types, whether it is an output node, and a
``Behaviour`` that tells the executor how the node costs time and what it produces.

Inputs a real node requires but the simulation does not need (conditioning, VAE, CLIP,
sampler names) are declared optional here, so that graphs recorded from a real server with
model-free stand-in nodes (tests/fixtures/comfyui) run unchanged. Every value that is present
is still validated like ComfyUI does: min/max, combo lists, conversions, link types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

MAX_RESOLUTION = 16384
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
# A combo filled from a model folder: any file name is accepted (the folder is not simulated).
MODEL_FILE = "MODEL_FILE"

SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "gradient_estimation",
    "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
)  # fmt: skip
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CLIP_TYPES = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
    "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
    "hunyuan_image", "flux2", "ovis",
)  # fmt: skip
VIDEO_FORMATS = (
    "image/gif", "image/webp", "video/16bit-png", "video/8bit-png", "video/av1-webm",
    "video/ffmpeg-gif", "video/h264-mp4", "video/h265-mp4", "video/nvenc_av1-mp4",
    "video/nvenc_h264-mp4", "video/nvenc_hevc-mp4", "video/ProRes", "video/webm",
)  # fmt: skip


class Behaviour(StrEnum):
    """How a node spends time and what it outputs (see ``executor.PromptExecutor``)."""

    LOADER = "loader"  # loads the model named by its first MODEL_FILE input; slow once
    ENCODE = "encode"  # text encode: short and constant
    LATENT = "latent"  # empty latent image or video: instant
    PATCH = "patch"  # model patch: instant, passes the model through
    SAMPLER = "sampler"  # one progress tick (and optional preview) per step
    DECODE = "decode"  # VAE decode, proportional to frames
    IMAGE_OP = "image_op"  # cheap per-frame image operation
    UPSCALE = "upscale"  # model upscale, per-frame progress
    SAVE_IMAGES = "save_images"  # one PNG per image
    PREVIEW_IMAGES = "preview_images"  # temp PNGs
    SAVE_ANIMATION = "save_animation"  # one animated file (webp/webm), "animated": [true]
    VIDEO_COMBINE = "video_combine"  # Video Helper Suite: one video, per-frame progress


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input. ``type`` is a widget type, a link type, or a tuple of combo options."""

    name: str
    type: str | tuple[str, ...]
    options: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    required: bool = True

    @property
    def is_widget(self) -> bool:
        return isinstance(self.type, tuple) or self.type in WIDGET_TYPES or self.type == MODEL_FILE

    def config(self) -> list[Any]:
        """The ``input_config`` ComfyUI puts in validation errors: ``[type, options]``."""
        kind: Any = list(self.type) if isinstance(self.type, tuple) else self.type
        return [kind, dict(self.options)]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    class_type: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    behaviour: Behaviour
    output_node: bool = False
    reports_progress: bool = False
    load_weight: float = 1.0  # loaders: load time relative to a checkpoint
    vram_bytes: int = 0  # loaders: memory the loaded model occupies

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


def _in(
    name: str, kind: str | tuple[str, ...], *, required: bool = True, **options: Any
) -> InputSpec:
    return InputSpec(name, kind, MappingProxyType(options), required)


def _int(name: str, default: int, lo: int, hi: int, **extra: Any) -> InputSpec:
    return _in(name, "INT", default=default, min=lo, max=hi, **extra)


def _float(name: str, default: float, lo: float, hi: float, **extra: Any) -> InputSpec:
    return _in(name, "FLOAT", default=default, min=lo, max=hi, **extra)


def _opt(spec: InputSpec) -> InputSpec:
    return InputSpec(spec.name, spec.type, spec.options, required=False)


_SEED = _int("seed", 0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True)
_SAMPLER_INPUTS = (
    _in("model", "MODEL"),
    _SEED,
    _int("steps", 20, 1, 10000),
    _float("cfg", 8.0, 0.0, 100.0, step=0.1, round=0.01),
    _in("sampler_name", SAMPLERS, required=False),
    _in("scheduler", SCHEDULERS, required=False),
    _in("positive", "CONDITIONING", required=False),
    _in("negative", "CONDITIONING", required=False),
    _in("latent_image", "LATENT"),
    _opt(_float("denoise", 1.0, 0.0, 1.0, step=0.01)),
)
_ADVANCED_SAMPLER_INPUTS = (
    _in("model", "MODEL"),
    _in("add_noise", ("enable", "disable"), required=False),
    _int("noise_seed", 0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
    _int("steps", 20, 1, 10000),
    _float("cfg", 8.0, 0.0, 100.0, step=0.1, round=0.01),
    _in("sampler_name", SAMPLERS, required=False),
    _in("scheduler", SCHEDULERS, required=False),
    _in("positive", "CONDITIONING", required=False),
    _in("negative", "CONDITIONING", required=False),
    _in("latent_image", "LATENT"),
    _opt(_int("start_at_step", 0, 0, 10000)),
    _opt(_int("end_at_step", 10000, 0, 10000)),
    _in("return_with_leftover_noise", ("disable", "enable"), required=False),
)
_BATCH = _int("batch_size", 1, 1, 4096, tooltip="The number of latent images in the batch.")


def _empty_latent(class_type: str, size: int, step: int) -> NodeSpec:
    dimensions = (_int(name, size, 16, MAX_RESOLUTION, step=step) for name in ("width", "height"))
    return NodeSpec(class_type, (*dimensions, _BATCH), ("LATENT",), Behaviour.LATENT)


_GIB = 1 << 30

_NODES = (
    NodeSpec(
        "CheckpointLoaderSimple",
        (_in("ckpt_name", MODEL_FILE),),
        ("MODEL", "CLIP", "VAE"),
        Behaviour.LOADER,
        load_weight=1.0,
        vram_bytes=int(6.5 * _GIB),
    ),
    NodeSpec(
        "UNETLoader",
        (
            _in("unet_name", MODEL_FILE),
            _in(
                "weight_dtype",
                ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
                required=False,
            ),
        ),
        ("MODEL",),
        Behaviour.LOADER,
        load_weight=2.5,
        vram_bytes=int(14.3 * _GIB),
    ),
    NodeSpec(
        "CLIPLoader",
        (
            _in("clip_name", MODEL_FILE),
            _in("type", CLIP_TYPES, required=False),
            _in("device", ("default", "cpu"), required=False),
        ),
        ("CLIP",),
        Behaviour.LOADER,
        load_weight=1.2,
        vram_bytes=int(6.7 * _GIB),
    ),
    NodeSpec(
        "VAELoader",
        (_in("vae_name", MODEL_FILE),),
        ("VAE",),
        Behaviour.LOADER,
        load_weight=0.2,
        vram_bytes=int(0.25 * _GIB),
    ),
    NodeSpec(
        "LoraLoader",
        (
            _in("model", "MODEL"),
            _in("clip", "CLIP", required=False),
            _in("lora_name", MODEL_FILE),
            _float("strength_model", 1.0, -100.0, 100.0, step=0.01),
            _opt(_float("strength_clip", 1.0, -100.0, 100.0, step=0.01)),
        ),
        ("MODEL", "CLIP"),
        Behaviour.LOADER,
        load_weight=0.2,
        vram_bytes=int(0.3 * _GIB),
    ),
    NodeSpec(
        "UpscaleModelLoader",
        (_in("model_name", MODEL_FILE),),
        ("UPSCALE_MODEL",),
        Behaviour.LOADER,
        load_weight=0.1,
        vram_bytes=int(0.07 * _GIB),
    ),
    NodeSpec(
        "CLIPTextEncode",
        (_in("text", "STRING", multiline=True, dynamicPrompts=True), _in("clip", "CLIP")),
        ("CONDITIONING",),
        Behaviour.ENCODE,
    ),
    _empty_latent("EmptyLatentImage", 512, 8),
    _empty_latent("EmptySD3LatentImage", 1024, 16),
    NodeSpec(
        "EmptyHunyuanLatentVideo",
        (
            _int("width", 848, 16, MAX_RESOLUTION, step=16),
            _int("height", 480, 16, MAX_RESOLUTION, step=16),
            _int("length", 25, 1, MAX_RESOLUTION, step=4),
            _int("batch_size", 1, 1, 4096),
        ),
        ("LATENT",),
        Behaviour.LATENT,
    ),
    NodeSpec(
        "ModelSamplingSD3",
        (_in("model", "MODEL"), _float("shift", 3.0, 0.0, 100.0, step=0.01)),
        ("MODEL",),
        Behaviour.PATCH,
    ),
    NodeSpec("KSampler", _SAMPLER_INPUTS, ("LATENT",), Behaviour.SAMPLER),
    NodeSpec("KSamplerAdvanced", _ADVANCED_SAMPLER_INPUTS, ("LATENT",), Behaviour.SAMPLER),
    NodeSpec(
        "VAEDecode",
        (_in("samples", "LATENT"), _in("vae", "VAE", required=False)),
        ("IMAGE",),
        Behaviour.DECODE,
    ),
    NodeSpec(
        "VAEDecodeTiled",
        (
            _in("samples", "LATENT"),
            _in("vae", "VAE", required=False),
            _opt(_int("tile_size", 512, 64, 4096, step=32)),
            _opt(_int("overlap", 64, 0, 4096, step=32)),
            _opt(_int("temporal_size", 64, 8, 4096, step=4)),
            _opt(_int("temporal_overlap", 8, 4, 4096, step=4)),
        ),
        ("IMAGE",),
        Behaviour.DECODE,
        reports_progress=True,
    ),
    NodeSpec(
        "ImageScale",
        (
            _in("image", "IMAGE"),
            _in("upscale_method", UPSCALE_METHODS),
            _int("width", 512, 0, MAX_RESOLUTION, step=1),
            _int("height", 512, 0, MAX_RESOLUTION, step=1),
            _in("crop", ("disabled", "center")),
        ),
        ("IMAGE",),
        Behaviour.IMAGE_OP,
    ),
    NodeSpec(
        "ImageBlur",
        (
            _in("image", "IMAGE"),
            _int("blur_radius", 1, 1, 31, step=1),
            _float("sigma", 1.0, 0.1, 10.0, step=0.1),
        ),
        ("IMAGE",),
        Behaviour.IMAGE_OP,
    ),
    NodeSpec(
        "ImageUpscaleWithModel",
        (_in("upscale_model", "UPSCALE_MODEL", required=False), _in("image", "IMAGE")),
        ("IMAGE",),
        Behaviour.UPSCALE,
        reports_progress=True,
    ),
    NodeSpec(
        "SaveImage",
        (
            _in("images", "IMAGE"),
            _in("filename_prefix", "STRING", default="ComfyUI"),
        ),
        (),
        Behaviour.SAVE_IMAGES,
        output_node=True,
    ),
    NodeSpec(
        "PreviewImage", (_in("images", "IMAGE"),), (), Behaviour.PREVIEW_IMAGES, output_node=True
    ),
    NodeSpec(
        "SaveAnimatedWEBP",
        (
            _in("images", "IMAGE"),
            _in("filename_prefix", "STRING", default="ComfyUI"),
            _float("fps", 6.0, 0.01, 1000.0, step=0.01),
            _in("lossless", "BOOLEAN", default=True),
            _int("quality", 80, 0, 100),
            _in("method", ("default", "fastest", "slowest")),
        ),
        (),
        Behaviour.SAVE_ANIMATION,
        output_node=True,
    ),
    NodeSpec(
        "SaveWEBM",
        (
            _in("images", "IMAGE"),
            _in("filename_prefix", "STRING", default="ComfyUI/video"),
            _in("codec", ("vp9", "av1")),
            _float("fps", 24.0, 0.01, 1000.0, step=0.01),
            _float("crf", 32.0, 0.0, 63.0, step=1),
        ),
        (),
        Behaviour.SAVE_ANIMATION,
        output_node=True,
    ),
    NodeSpec(
        "VHS_VideoCombine",
        (
            _in("images", "IMAGE"),
            _float("frame_rate", 8.0, 1.0, 1000.0, step=1),
            _int("loop_count", 0, 0, 100, step=1),
            _in("filename_prefix", "STRING", default="AnimateDiff"),
            _in("format", VIDEO_FORMATS),
            _in("pingpong", "BOOLEAN", default=False),
            _in("save_output", "BOOLEAN", default=True),
        ),
        ("VHS_FILENAMES",),
        Behaviour.VIDEO_COMBINE,
        output_node=True,
        reports_progress=True,
    ),
)

NODES: MappingProxyType[str, NodeSpec] = MappingProxyType({n.class_type: n for n in _NODES})
