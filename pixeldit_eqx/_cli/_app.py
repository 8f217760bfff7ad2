"""The commands of `pixeldit-eqx` (typer): sample, convert, info, train-digits."""

import json
import os
import pathlib
import tempfile
import typing
from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import typer

from .. import _infer, flow
from .._convert import load_reference, save_safetensors
from .._images import save_image_grid
from .._optional import require
from .._presets import PRESETS
from .._sample import sample as sample_any
from ..modules import trainable
from . import _files


app = typer.Typer(
    name="pixeldit-eqx",
    help="PixelDiT in JAX: sample, convert and inspect PixelDiT weights, or train the digits job.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_METHODS = ("euler", "heun", "flowdpm")
_GROUNDED_METHODS = ("heun", "euler")


def _preset(name: str | None) -> Any:
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"`--preset`: unknown preset {name!r}; presets are {sorted(PRESETS)}.")
    return PRESETS[name]


def _load_model(path: pathlib.Path, preset: str | None, encoder_weights: pathlib.Path | None = None) -> Any:
    """A model from any file this project reads: a `train.save_model` file, a
    `.safetensors` file that carries its config (`save_safetensors`), or reference weights
    (`.safetensors`, `.pt`, `.ckpt`: EMA weights when present) for `--preset`; a PixelDiT2's
    grounding encoder from `encoder_weights` when given."""
    kind = _files.kind_of(path)
    if kind == "model":
        if encoder_weights is not None:
            raise ValueError("`--encoder-weights`: a model file holds its whole network; leave it out.")
        from .. import train

        return train.load_model(path)
    if preset is None and _files.stored_config(path, kind) is None:
        raise ValueError(
            f"`--preset`: {path.name} holds reference weights, which carry no config: name the preset they "
            f"belong to ({', '.join(sorted(PRESETS))}), or pass a model file written by train.save_model or "
            "a .safetensors file written by pixeldit-eqx convert."
        )
    if encoder_weights is None:
        return load_reference(path, preset)
    return load_reference(path, preset, encoder_weights=encoder_weights)


def _parse_classes(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        classes = []
    if not classes:
        raise ValueError(f"`--classes`: expected comma-separated class labels such as 207,360,387, got {text!r}.")
    return classes


@app.command()
def sample(
    weights: Annotated[
        str,
        typer.Option(
            help="a model file (train.save_model) or reference weights (.safetensors, .pt, .ckpt): a path or an "
            "hf://owner/repo[@revision]/file id"
        ),
    ],
    preset: Annotated[
        str | None,
        typer.Option(help="the released network the weights belong to; its sampling settings become the defaults"),
    ] = None,
    encoder_weights: Annotated[
        str | None,
        typer.Option(
            help="PixelDiT2: its grounding encoder's weights (timm DINOv3 .safetensors, a path or hf:// id), for "
            "weights without them"
        ),
    ] = None,
    classes: Annotated[str, typer.Option(help="comma-separated class labels, one grid row each")] = "0",
    per_class: Annotated[int, typer.Option(help="samples per class (the grid's columns)")] = 4,
    steps: Annotated[int | None, typer.Option(help="integration steps [default: the preset's, else 50]")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="euler, heun or flowdpm (PixelDiT only) [default: the preset's, else flowdpm for a PixelDiT "
            "and heun for a PixelDiT2]"
        ),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale [default: the preset's, else 1]")
    ] = None,
    guidance_interval: Annotated[
        tuple[float, float] | None,
        typer.Option(help="times (t_min, t_max) where guidance applies [default: the preset's, else 0 1]"),
    ] = None,
    shift: Annotated[float | None, typer.Option(help="time shift of the grid [default: the preset's, else 1]")] = None,
    resolution: Annotated[int | None, typer.Option(help="image side in pixels [default: the preset's]")] = None,
    noise_scale: Annotated[
        float | None, typer.Option(help="the start is noise * noise-scale [default: the preset's, else 1]")
    ] = None,
    t_eps: Annotated[
        float | None, typer.Option(help="PixelDiT2's floor of 1 - t in the velocity [default: the preset's, else 0.05]")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the noise")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per compiled call")] = 8,
    out: Annotated[pathlib.Path, typer.Option(help="the PNG grid to write")] = pathlib.Path("grid.png"),
    progress: Annotated[bool, typer.Option(help="a progress bar over batches")] = True,
) -> None:
    """Draw class-conditional samples (PixelDiT or PixelDiT2) and write them as a PNG grid, one row per class."""
    weights_path = _files._resolve_weights(weights)
    settings = _preset(preset)
    sampling = (_files.preset_field(settings, "sampling") if settings is not None else None) or {}
    steps = int(sampling.get("num_steps", 50) if steps is None else steps)
    guidance = float(sampling.get("guidance", 1.0) if guidance is None else guidance)
    t_min, t_max = sampling.get("guidance_interval", (0.0, 1.0)) if guidance_interval is None else guidance_interval
    interval = (float(t_min), float(t_max))
    shift = float(sampling.get("shift", 1.0) if shift is None else shift)
    noise_scale = float(sampling.get("noise_scale", 1.0) if noise_scale is None else noise_scale)
    t_eps = float(sampling.get("t_eps", 0.05) if t_eps is None else t_eps)
    if resolution is None and settings is not None:
        resolution = _files.preset_field(settings, "resolution")
    labels = _parse_classes(classes)
    if method is not None and method not in _METHODS:
        raise ValueError(f"`--method` must be one of {', '.join(_METHODS)}, got {method!r}.")
    if per_class < 1 or batch_size < 1:
        raise ValueError(f"`--per-class` and `--batch-size` must be >= 1, got {per_class} and {batch_size}.")
    if resolution is None:
        raise ValueError("`--resolution`: needed without a --preset (the image side in pixels).")

    encoder_path = None if encoder_weights is None else _files._resolve_weights(encoder_weights, "--encoder-weights")
    model = _load_model(weights_path, preset, encoder_path)
    variant = getattr(type(model), "variant", None)
    if variant not in ("c2i", "pixeldit2"):
        raise ValueError(
            f"`--weights`: `sample` draws class-conditional models; this is a {type(model).__name__}, which "
            "needs text embeddings (use pixeldit_eqx.sample from Python)."
        )
    grounded = variant == "pixeldit2"
    method = str(sampling.get("method", "heun" if grounded else "flowdpm") if method is None else method)
    if grounded and method not in _GROUNDED_METHODS:
        raise ValueError(f"`--method`: a PixelDiT2 samples with {' or '.join(_GROUNDED_METHODS)}, got {method!r}.")
    bad = [c for c in labels if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"`--classes`: labels must be in [0, {model.num_classes}), got {bad}.")
    if resolution % model.patch_size:
        raise ValueError(f"`--resolution` must be a multiple of the patch size {model.patch_size}, got {resolution}.")

    all_labels = np.repeat(np.asarray(labels, dtype=np.int32), per_class)
    shape = (model.in_channels, resolution, resolution)
    null = model.num_classes if guidance != 1.0 else None
    key = jr.key(seed)

    @eqx.filter_jit
    def draw(model, indices, ys):
        def one(i, y):
            noise = jr.normal(jr.fold_in(key, i), shape)  # image i's noise, whatever the batch size
            if grounded:  # PixelDiT2's grounded sampler: x-prediction, null label and no grounding
                return sample_any(
                    model,
                    noise,
                    y,
                    num_steps=steps,
                    method=method,
                    guidance=guidance,
                    guidance_interval=interval,
                    shift=shift,
                    noise_scale=noise_scale,
                    t_eps=t_eps,
                )
            return flow.sample(
                model,
                noise * noise_scale,
                y,
                num_steps=steps,
                method=method,
                guidance=guidance,
                null_cond=null,
                guidance_interval=interval,
                shift=shift,
            )

        return jax.vmap(one)(indices, ys)

    tqdm = require("tqdm.auto", "cli", "the progress bar of `sample`").tqdm
    n = len(all_labels)
    images = []
    with tqdm(total=n, unit="image", desc="sample", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)  # the last batch is padded: one compiled shape
            ys = all_labels[np.minimum(idx, n - 1)]
            batch = np.asarray(draw(model, jnp.asarray(idx), jnp.asarray(ys)))
            images.append(batch[: n - start])
            bar.update(min(batch_size, n - start))
    save_image_grid(np.concatenate(images), out, nrow=per_class)
    typer.echo(f"wrote {out}: {len(labels)} classes x {per_class} samples, {resolution}x{resolution}")


def _config_to_store(weights: dict[str, Any], preset: str | None) -> tuple[Any, str | None, str]:
    """`(config, variant, what convert says of it)` for `convert` to store with the weights:
    the preset's; else the one preset's the weights fit; else, for a PixelDiT, the config
    read from the weights (what leaves no trace in them at the reference defaults)."""
    if preset is not None:
        _preset(preset)
        return preset, None, f"stored, the preset {preset!r}'s"
    try:
        variant, config = _files.infer_config(weights)
        fits = _files.fitting_presets(variant, config, weights)
    except ValueError as e:
        return None, None, f"not stored ({e}); pass --preset to store one"
    configs = {json.dumps(_files.preset_field(PRESETS[name], "config"), sort_keys=True) for name in fits}
    if len(configs) == 1:
        return fits[0], None, f"stored, the config of the preset(s) it fits: {', '.join(fits)}"
    if variant == "pixeldit2":
        return None, None, "not stored (a PixelDiT2 that fits no preset); pass --preset to store one"
    return config, variant, f"stored, a {variant} config read from the weight names and shapes"


@app.command()
def convert(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE", help="a torch checkpoint (.ckpt, .pt, .pth) or .safetensors: a path or an hf:// id"
        ),
    ],
    target: Annotated[pathlib.Path, typer.Argument(metavar="TARGET", help="the .safetensors file to write")],
    ema: Annotated[
        bool | None,
        typer.Option("--ema/--no-ema", help="keep the EMA weights (default: the EMA weights when present)"),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="the released network the weights belong to: its config is stored in the file [default: the "
            "config read from the weights, or the one preset they fit]"
        ),
    ] = None,
) -> None:
    """Write the weights of one model of a checkpoint as .safetensors (with its config), without torch."""
    path = _files._resolve_weights(source, "SOURCE")
    kind = _files.kind_of(path)
    if kind == "model":
        raise ValueError(f"`{source}`: a pixeldit_eqx model file; load it with train.load_model, nothing to convert.")
    tensors, others = _files.read_tensors(path, kind)
    weights, prefix, dropped = _files.select(tensors, ema)
    if not weights:
        raise ValueError(f"`{source}`: holds no tensors to convert.")
    params = sum(int(np.size(v)) for v in weights.values())
    dtypes = sorted({np.asarray(v).dtype.name for v in weights.values()})
    what = "the EMA weights" if prefix == _files.EMA_PREFIX else "the weights"
    where = f" under {prefix!r} (prefix removed)" if prefix else ""
    typer.echo(f"kept: {len(weights)} tensors, {params:,} parameters ({', '.join(dtypes)}): {what}{where}")
    parts = [f"{k} ({n} tensors)" for k, n in dropped.items()] + others
    typer.echo(f"dropped: {', '.join(parts) if parts else 'nothing'}")
    config, variant, why = _config_to_store(weights, preset)
    typer.echo(f"config: {why}")
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".convert-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_safetensors(tmp, weights, config=config, variant=variant)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    typer.echo(f"wrote {target}")


@app.command()
def info(
    file: Annotated[
        str,
        typer.Argument(metavar="FILE", help="a model file, .safetensors or torch checkpoint: a path or an hf:// id"),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of lines")] = False,
) -> None:
    """Describe a weights file: variant, config, parameters, dtype, EMA, problems found."""
    path = _files._resolve_weights(file, "FILE")
    kind = _files.kind_of(path)
    report: dict[str, Any] = {"file": file}
    problems: list[str] = []
    if kind == "model":
        from .. import train

        with open(path, "rb") as f:
            header = train._read_header(f, file)
        model = train.load_model(path)
        leaves = jax.tree.leaves(eqx.filter(model, trainable(model)))
        report.update(
            format="pixeldit_eqx model file (train.save_model)",
            variant=header["variant"],
            config=header["config"],
            parameters=sum(int(x.size) for x in leaves),
            dtype=header.get("dtype"),
            ema="one set of weights (a model file holds one model)",
        )
        nonfinite = sum(int(np.sum(~np.isfinite(np.asarray(x, dtype=np.float32)))) for x in leaves)
        if nonfinite:
            problems.append(f"{nonfinite} non-finite parameter value(s) (nan/inf)")
    else:
        tensors, others = _files.read_tensors(path, kind)
        weights, prefix, dropped = _files.select(tensors, None)
        report.update(
            format="safetensors" if kind == "safetensors" else "torch checkpoint (read without torch)",
            weights_prefix=prefix or None,
            ema=_files.EMA_PREFIX in {k.split(".", 1)[0] + "." for k in tensors},
            parameters=sum(int(np.size(v)) for v in weights.values()),
            dtype=", ".join(sorted({np.asarray(v).dtype.name for v in weights.values()})) or None,
            other_entries=[f"{k} ({n} tensors)" for k, n in dropped.items()] + others,
        )
        stored = _files.stored_config(path, kind)
        if stored is not None:
            variant, config = stored
            variant = variant or _infer.variant_of_config(config) or _infer.variant_of_weights(weights)
            problem = None
        else:
            variant, config, problem = _infer.read_config(weights)
        if variant is not None:
            report.update(
                variant=variant,
                config=config,
                config_from="the file's metadata" if stored is not None else "the weight names and shapes",
            )
        if problem is not None:
            problems.append(problem)
        else:
            try:
                found = _files.mismatches(weights, _files.skeleton_shapes(config, variant))
            except ValueError as e:
                found = [f"the config builds no model: {e}"]
            problems += found
            report["presets"] = _files.fitting_presets(variant, config, weights) if not found else []
        bad = sorted(k for k, v in weights.items() if not np.isfinite(np.asarray(v, dtype=np.float32)).all())
        problems += [f"key {k!r}: has non-finite values (nan/inf)" for k in bad]
    report["problems"] = problems
    if as_json:
        typer.echo(json.dumps(report))
        return
    for k, v in report.items():
        if k == "problems":
            v = "none" if not v else f"{len(v)}\n  " + "\n  ".join(v)
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b!r}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(v) if v else "none"
        elif isinstance(v, bool) or v is None:
            v = {True: "yes", False: "no", None: "none"}[v]
        elif isinstance(v, int):
            v = f"{v:,}"
        typer.echo(f"{k}: {v}")


@app.command(
    "train-digits",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@typing.no_type_check  # typer hands over its own Context class, not the annotated one
def train_digits(ctx: typer.Context) -> None:
    """Train a small PixelDiT on scikit-learn's digits and sample a 10x10 grid (--help: its options)."""
    from .. import _digits, runtime

    runtime.tune_cpu_allocator()
    _digits.main(list(ctx.args), prog="pixeldit-eqx train-digits")
