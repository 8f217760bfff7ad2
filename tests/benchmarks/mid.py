"""The benchmarks' mid-size config (no jax import: `torch_reference.py` reads it too)."""

MID = dict(
    in_channels=3,
    patch_size=8,
    hidden_size=256,
    num_groups=4,
    patch_depth=6,
    pixel_depth=2,
    pixel_hidden_size=16,
    num_classes=1000,
)
BATCH = 8
