"""Named configurations of the released PixelDiT networks, with their sampling settings.

Plain dictionaries: nothing is built until `build`/`load_reference` is called.
"""

from collections.abc import Mapping
from typing import Any


_XL_C2I = dict(
    in_channels=3,
    patch_size=16,
    num_groups=16,
    hidden_size=1152,
    patch_depth=26,
    pixel_depth=4,
    pixel_hidden_size=16,
    num_classes=1000,
)

_T2I_1024 = dict(
    in_channels=3,
    patch_size=16,
    num_groups=24,
    hidden_size=1536,
    pixel_hidden_size=16,
    pixel_attn_hidden_size=1152,
    pixel_num_groups=16,
    patch_depth=14,
    pixel_depth=2,
    txt_embed_dim=2304,
    txt_max_length=300,
    use_text_rope=True,
    text_rope_theta=10000.0,
)

_PIXELDIT2_H16 = dict(
    in_channels=3,
    hidden_size=1280,
    num_heads=16,
    depth=32,
    patch_size=16,
    num_classes=1000,
    in_context_len=32,
    in_context_start=8,
    attn_dropout=0.0,
    proj_dropout=0.2,
    grounding_proj_blocks=1,
    grounding_proj_heads=16,
)

#: Preset name -> `variant`, constructor `config`, image `resolution` and the released
#: `sampling` settings (steps, guidance scale, guidance interval, time shift; for PixelDiT2
#: also the method, the initial noise scale and `t_eps`).
PRESETS: dict[str, dict[str, Any]] = {
    "pixeldit-xl-c2i-256": dict(
        variant="c2i",
        config=_XL_C2I,
        resolution=256,
        sampling=dict(num_steps=100, guidance=2.75, guidance_interval=(0.1, 0.9), shift=1.0),
    ),
    "pixeldit-xl-c2i-512": dict(
        variant="c2i",
        config=_XL_C2I,
        resolution=512,
        sampling=dict(num_steps=100, guidance=3.5, guidance_interval=(0.1, 1.0), shift=2.0),
    ),
    "pixeldit-t2i-1024": dict(variant="t2i", config=_T2I_1024, resolution=1024, sampling=None),
    # PixelDiT2-H/16 (`c2i/configs/pixeldit2_h16_in{256,512}.yaml`): grounded Heun sampling,
    # the last step Euler, on x-predictions turned into velocities with `t_eps`.
    "pixeldit2-h16-256": dict(
        variant="pixeldit2",
        config=dict(_PIXELDIT2_H16, mlp_hidden_multiple=0, grounding_encoder="dinov3_vits16", single_silu_cond=False),
        resolution=256,
        sampling=dict(
            num_steps=50, method="heun", guidance=2.4, guidance_interval=(0.125, 0.9), noise_scale=1.0, t_eps=0.05
        ),
    ),
    "pixeldit2-h16-512": dict(
        variant="pixeldit2",
        config=dict(_PIXELDIT2_H16, mlp_hidden_multiple=32, grounding_encoder="dinov3_vitb16", single_silu_cond=True),
        resolution=512,
        sampling=dict(
            num_steps=50, method="heun", guidance=2.1, guidance_interval=(0.1, 0.925), noise_scale=2.0, t_eps=0.05
        ),
    ),
}


def resolve(config: Mapping[str, Any] | str) -> tuple[dict[str, Any], str | None]:
    """A config mapping, or a preset name -> `(constructor kwargs, variant or None)`."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"`config`: unknown preset {config!r}; presets are {sorted(PRESETS)}.")
        preset = PRESETS[config]
        return dict(preset["config"]), preset["variant"]
    if not isinstance(config, Mapping):
        raise ValueError(
            f"`config` must be a mapping of constructor arguments or a preset name, got {type(config).__name__}."
        )
    return dict(config), None
