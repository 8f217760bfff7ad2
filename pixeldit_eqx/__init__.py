"""PixelDiT, NVIDIA's pixel-space diffusion transformer, in Equinox.

Typed, shape-checked, one example per call (`jax.vmap` for batches), and equal to the
PyTorch reference; loads the released checkpoints without torch.
"""

import importlib as _importlib
from importlib import metadata as _metadata
from typing import Any as _Any

from . import flow as flow, modules as modules, runtime as runtime
from ._attention import (
    JointAttention as JointAttention,
    RotaryAttention as RotaryAttention,
)
from ._blocks import (
    BlockStack as BlockStack,
    DiTBlock as DiTBlock,
    MMDiTBlock as MMDiTBlock,
    PiTBlock as PiTBlock,
)
from ._config import (
    build as build,
    PixelDiT2Config as PixelDiT2Config,
    PixelDiTConfig as PixelDiTConfig,
    PixelDiTT2IConfig as PixelDiTT2IConfig,
)
from ._convert import (
    load_reference as load_reference,
    load_state_dict as load_state_dict,
    save_safetensors as save_safetensors,
    state_dict as state_dict,
    StateDictError as StateDictError,
)
from ._dinov2 import DINOv2 as DINOv2
from ._dinov3 import DINOv3 as DINOv3, DINOv3Config as DINOv3Config
from ._images import save_image_grid as save_image_grid
from ._model import PixelDiT as PixelDiT, PixelDiTT2I as PixelDiTT2I
from ._pixeldit2 import GroundingConditioner as GroundingConditioner, PixelDiT2 as PixelDiT2
from ._presets import PRESETS as PRESETS
from ._resize import resize_bicubic as resize_bicubic
from ._rope import apply_rope as apply_rope, rope_1d as rope_1d, rope_2d as rope_2d
from ._sample import sample as sample
from ._theta import ParameterConditioned as ParameterConditioned, ParameterTokens as ParameterTokens
from ._tokens import (
    ClassEmbedder as ClassEmbedder,
    PatchEmbedder as PatchEmbedder,
    patchify as patchify,
    PixelEmbedder as PixelEmbedder,
    TextEmbedder as TextEmbedder,
    unpatchify as unpatchify,
)
from ._torch_pickle import (
    CheckpointFormatError as CheckpointFormatError,
    load_torch_file as load_torch_file,
    UnsafeCheckpointError as UnsafeCheckpointError,
)
from .modules import (
    Buffer as Buffer,
    cast_params as cast_params,
    FinalLayer as FinalLayer,
    get_2d_sincos_pos_embed as get_2d_sincos_pos_embed,
    PixelMLP as PixelMLP,
    RMSNorm as RMSNorm,
    SwiGLU as SwiGLU,
    timestep_embedding as timestep_embedding,
    TimestepConditioner as TimestepConditioner,
    trainable as trainable,
)


try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("pixeldit-eqx")
except _metadata.PackageNotFoundError:  # imported from a checkout that was not installed
    __version__ = "0+unknown"


# `train` and `sharding` need optax (the `train` extra): imported on first use, so that
# `import pixeldit_eqx` works without it and `px.train` names the extra when it is missing.
_LAZY_SUBMODULES = ("sharding", "train")


def __getattr__(name: str) -> _Any:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
