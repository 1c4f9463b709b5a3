"""What the simulated server does differently by ComfyUI version (protocol §8)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Features:
    version: str
    progress_state: bool  # progress_state frames, binary event 4, feature_flags (v0.3.45)
    targeted_interrupt: bool  # POST /interrupt honours prompt_id (v0.3.57)
    create_time: bool  # extra_data.create_time in /queue and /history (v0.3.69)
    system_os: str  # system_stats.system.os: os.name before v0.4.0, sys.platform since
    prompt_preview_method: bool  # extra_data.preview_method per prompt (v0.5.0)
    jobs_api: bool  # /api/jobs and /api/jobs/{id} (v0.6.0)
    # a cached output node's UI reaches history only with a client id: v0.8.0, not v0.3.64
    cached_ui_needs_client_id: bool

    @classmethod
    def for_version(cls, version: str) -> Features:
        match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
        if match is None:
            raise ValueError(f"version {version!r} is not a ComfyUI release like '0.8.0'")
        release = tuple(int(part) for part in match.groups())
        return cls(
            version=".".join(str(part) for part in release),
            progress_state=release >= (0, 3, 45),
            targeted_interrupt=release >= (0, 3, 57),
            create_time=release >= (0, 3, 69),
            system_os="linux" if release >= (0, 4, 0) else "posix",
            prompt_preview_method=release >= (0, 5, 0),
            jobs_api=release >= (0, 6, 0),
            cached_ui_needs_client_id=release >= (0, 8, 0),
        )
