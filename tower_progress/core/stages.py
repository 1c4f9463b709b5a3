"""ComfyUI node ``class_type`` → pipeline stage, through one table.

Exact names come first (built-in nodes and the common video packs), then name patterns for the
long tail of custom nodes (``*Loader`` loads, ``*Sampler`` samples, ``*Decode`` decodes). A node
that matches nothing is ``processing``: an unknown node is normal, never an error.
"""

from __future__ import annotations

from collections.abc import Mapping

from tower_progress.core.model import Stage

EXACT: Mapping[str, Stage] = {
    # loaders
    "CheckpointLoaderSimple": Stage.LOADING,
    "CheckpointLoader": Stage.LOADING,
    "ImageOnlyCheckpointLoader": Stage.LOADING,
    "UNETLoader": Stage.LOADING,
    "UnetLoaderGGUF": Stage.LOADING,
    "CLIPLoader": Stage.LOADING,
    "DualCLIPLoader": Stage.LOADING,
    "TripleCLIPLoader": Stage.LOADING,
    "CLIPVisionLoader": Stage.LOADING,
    "VAELoader": Stage.LOADING,
    "LoraLoader": Stage.LOADING,
    "LoraLoaderModelOnly": Stage.LOADING,
    "ControlNetLoader": Stage.LOADING,
    "UpscaleModelLoader": Stage.LOADING,
    "ADE_AnimateDiffLoaderWithContext": Stage.LOADING,
    "ADE_AnimateDiffLoaderGen1": Stage.LOADING,
    "ADE_LoadAnimateDiffModel": Stage.LOADING,
    "ADE_ApplyAnimateDiffModel": Stage.LOADING,
    "ADE_UseEvolvedSampling": Stage.PREPARING,
    "WanVideoModelLoader": Stage.LOADING,
    "WanVideoVAELoader": Stage.LOADING,
    "HyVideoModelLoader": Stage.LOADING,
    "HyVideoVAELoader": Stage.LOADING,
    "LTXVLoader": Stage.LOADING,
    # text encoders, conditioning, latents, image inputs
    "CLIPTextEncode": Stage.PREPARING,
    "CLIPTextEncodeSDXL": Stage.PREPARING,
    "CLIPTextEncodeFlux": Stage.PREPARING,
    "CLIPVisionEncode": Stage.PREPARING,
    "ConditioningCombine": Stage.PREPARING,
    "ConditioningSetArea": Stage.PREPARING,
    "ControlNetApply": Stage.PREPARING,
    "ControlNetApplyAdvanced": Stage.PREPARING,
    "EmptyLatentImage": Stage.PREPARING,
    "EmptySD3LatentImage": Stage.PREPARING,
    "EmptyHunyuanLatentVideo": Stage.PREPARING,
    "EmptyMochiLatentVideo": Stage.PREPARING,
    "EmptyLTXVLatentVideo": Stage.PREPARING,
    "EmptyCosmosLatentVideo": Stage.PREPARING,
    "LTXVImgToVideo": Stage.PREPARING,
    "LTXVConditioning": Stage.PREPARING,
    "LTXVScheduler": Stage.PREPARING,
    "WanImageToVideo": Stage.PREPARING,
    "WanFunControlToVideo": Stage.PREPARING,
    "WanFirstLastFrameToVideo": Stage.PREPARING,
    "WanVaceToVideo": Stage.PREPARING,
    "HunyuanImageToVideo": Stage.PREPARING,
    "WanVideoTextEncode": Stage.PREPARING,
    "WanVideoEmptyEmbeds": Stage.PREPARING,
    "WanVideoImageToVideoEncode": Stage.PREPARING,
    "HyVideoTextEncode": Stage.PREPARING,
    "ModelSamplingSD3": Stage.PREPARING,
    "ModelSamplingFlux": Stage.PREPARING,
    "KSamplerSelect": Stage.PREPARING,
    "BasicScheduler": Stage.PREPARING,
    "BasicGuider": Stage.PREPARING,
    "CFGGuider": Stage.PREPARING,
    "RandomNoise": Stage.PREPARING,
    "LoadImage": Stage.PREPARING,
    "LoadImageMask": Stage.PREPARING,
    "VHS_LoadVideo": Stage.PREPARING,
    "VHS_LoadVideoPath": Stage.PREPARING,
    "VHS_LoadImages": Stage.PREPARING,
    "VAEEncode": Stage.PREPARING,
    "VAEEncodeForInpaint": Stage.PREPARING,
    # samplers
    "KSampler": Stage.SAMPLING,
    "KSamplerAdvanced": Stage.SAMPLING,
    "SamplerCustom": Stage.SAMPLING,
    "SamplerCustomAdvanced": Stage.SAMPLING,
    "WanVideoSampler": Stage.SAMPLING,
    "HyVideoSampler": Stage.SAMPLING,
    "LTXVBaseSampler": Stage.SAMPLING,
    "ADE_KSampler": Stage.SAMPLING,
    # decoders
    "VAEDecode": Stage.DECODING,
    "VAEDecodeTiled": Stage.DECODING,
    "VAEDecodeHunyuan3D": Stage.DECODING,
    "WanVideoDecode": Stage.DECODING,
    "HyVideoDecode": Stage.DECODING,
    "LTXVTiledVAEDecode": Stage.DECODING,
    # writers
    "SaveImage": Stage.ENCODING,
    "PreviewImage": Stage.ENCODING,
    "SaveAnimatedWEBP": Stage.ENCODING,
    "SaveAnimatedPNG": Stage.ENCODING,
    "SaveWEBM": Stage.ENCODING,
    "SaveVideo": Stage.ENCODING,
    "CreateVideo": Stage.ENCODING,
    "VHS_VideoCombine": Stage.ENCODING,
}

# (kind, text, stage), first match wins; kinds: prefix, suffix, contains.
PATTERNS: tuple[tuple[str, str, Stage], ...] = (
    ("suffix", "Loader", Stage.LOADING),
    ("contains", "LoaderModel", Stage.LOADING),
    ("contains", "TextEncode", Stage.PREPARING),
    ("prefix", "Empty", Stage.PREPARING),
    ("suffix", "Sampler", Stage.SAMPLING),
    ("prefix", "KSampler", Stage.SAMPLING),
    ("contains", "Decode", Stage.DECODING),
    ("prefix", "Save", Stage.ENCODING),
    ("contains", "VideoCombine", Stage.ENCODING),
)

LABELS: Mapping[Stage, str] = {
    Stage.PENDING: "Waiting for submission",
    Stage.QUEUED: "Queued",
    Stage.LOADING: "Loading models",
    Stage.PREPARING: "Preparing",
    Stage.SAMPLING: "Sampling",
    Stage.DECODING: "Decoding",
    Stage.ENCODING: "Encoding output",
    Stage.PROCESSING: "Processing",
    Stage.FINALIZING: "Finalizing",
    Stage.DONE: "Done",
}

# Share of a typical job's wall time per stage, used until a workflow has history.
DEFAULT_WEIGHTS: Mapping[Stage, float] = {
    Stage.LOADING: 0.15,
    Stage.PREPARING: 0.05,
    Stage.SAMPLING: 0.65,
    Stage.DECODING: 0.08,
    Stage.ENCODING: 0.04,
    Stage.PROCESSING: 0.03,
}

_MATCHERS = {
    "prefix": str.startswith,
    "suffix": str.endswith,
    "contains": str.__contains__,
}


def stage_of(class_type: str) -> Stage:
    """The stage a node of this class runs in; ``processing`` when nothing matches."""
    exact = EXACT.get(class_type)
    if exact is not None:
        return exact
    for kind, text, stage in PATTERNS:
        if _MATCHERS[kind](class_type, text):
            return stage
    return Stage.PROCESSING
