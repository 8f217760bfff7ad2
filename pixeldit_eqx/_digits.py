"""The digits job: train a small class-conditional PixelDiT on scikit-learn's digits and sample it.

Run by `nox -s digits` (`examples/digits.py`) and `pixeldit-eqx train-digits`; needs the
`examples` extra (scikit-learn, Pillow). A few minutes on a laptop CPU, no download.

1. Data: `sklearn.datasets.load_digits` (1797 images of 8x8 pixels in 0..16),
   upsampled bilinearly to 16x16 and scaled to [-1, 1]; a fixed stratified 80/20
   split holds out 360 images for evaluation.
2. Training: a small `pixeldit_eqx.PixelDiT` (patch 4, width 64, two DiT blocks, one
   PiT block; 0.25M parameters) with the rectified-flow loss
   (`pixeldit_eqx.train.c2i_loss`, labels dropped to the null class 10% of the time),
   AdamW with warmup and cosine decay, an EMA of the weights (decay warming up to 0.995).
3. Sampling: the EMA model, Heun's method with classifier-free guidance, `--per-class`
   samples of every digit; the first ten of each make a 10x10 PNG grid (one row per
   class).
4. Evaluation: a classifier (RBF SVM) trained on the real training split labels the
   samples: `sample_accuracy` is the fraction labelled as the class they were
   generated for (its own held-out accuracy is `classifier_heldout_accuracy`).
   `frechet_distance` compares samples with the held-out real digits in the space of
   a 16-component PCA fitted on the training split; `frechet_distance_real_vs_real` is the same
   distance between as many real training digits and the held-out ones (the floor
   that finite samples allow).

The last line printed is a JSON summary (`total_seconds` counts from the end of the
imports). Uses only the public API of `pixeldit_eqx`.

`--model pixeldit2` trains a small PixelDiT2 instead (the same data and evaluation; by
default 1000 training steps and 12 Heun steps, each evaluating twice): x-prediction, each
patch grounded on a tiny random-init frozen DINOv3 (patch 4, so it sees the image at its
own size), four in-context class tokens, trained with
`pixeldit_eqx.train.pixeldit2_loss` (label and grounding dropout) and sampled with
`pixeldit_eqx.sample` (exact Heun, last step Euler; the unconditional branch drops the label
and the grounding).

```bash
python examples/digits.py                       # the defaults (how long: docs/performance.md)
python examples/digits.py --steps 3000 --out runs/  --save-samples runs/samples.npz
python examples/digits.py --quick               # a smoke test of the plumbing (mostly compile time)
python examples/digits.py --model pixeldit2     # the same job with PixelDiT2
```
"""

import argparse
import functools
import json
import pathlib
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import pixeldit_eqx
from pixeldit_eqx import flow, train


_START = time.perf_counter()

NUM_CLASSES = 10
MAX_INTENSITY = 16.0  # the digits' own units: 0 (background) .. 16 (ink)
SPLIT_SEED = 0  # the train/held-out split is fixed, whatever --seed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """A bad option ends as one line on stderr and exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The job's options (`--help` lists them); `prog` names the command in messages."""
    p = _Parser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", choices=("pixeldit", "pixeldit2"), default="pixeldit", help="the model family")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1500, pixeldit2 1000; --quick 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, training and sampling")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/digits_samples.png"),
        help="PNG path of the 10x10 grid, or a directory to write digits_samples.png in",
    )
    p.add_argument(
        "--save-samples",
        type=pathlib.Path,
        default=None,
        metavar="PATH",
        help="write every sample to an .npz: images (N, 1, H, W) in 0..16, labels (N,)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run: checks the plumbing, not the quality")
    p.add_argument("--resolution", type=int, default=16, help="image side the 8x8 digits are upsampled to")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--sample-steps", type=int, default=None, help="Heun steps (default 16, pixeldit2 12; --quick 4)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 50; --quick 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else (1000 if args.model == "pixeldit2" else 1500)
    if args.sample_steps is None:
        args.sample_steps = 4 if args.quick else (12 if args.model == "pixeldit2" else 16)
    if args.per_class is None:
        args.per_class = 10 if args.quick else 50
    if args.steps < 1 or args.sample_steps < 1 or args.per_class < 10:
        p.error("--steps and --sample-steps must be >= 1 and --per-class >= 10")
    if args.resolution < 8 or args.resolution % 4:
        p.error("--resolution must be a multiple of 4, >= 8")
    return args


def model_config(quick: bool, model: str = "pixeldit") -> dict:
    """The constructor arguments: patch 4 (16 tokens at 16x16), narrow and shallow."""
    if model == "pixeldit2":
        return dict(
            in_channels=1,
            hidden_size=32 if quick else 64,
            num_heads=4,
            depth=2 if quick else 3,
            patch_size=4,
            num_classes=NUM_CLASSES,
            in_context_len=4,
            in_context_start=1,
            # A tiny frozen DINOv3 (random weights) with the model's patch size.
            grounding_encoder=dict(embed_dim=32, depth=1, num_heads=2, patch_size=4),
            grounding_proj_blocks=1,
            grounding_proj_heads=4,
        )
    return dict(
        in_channels=1,
        num_groups=4,
        hidden_size=32 if quick else 64,
        pixel_hidden_size=8,
        patch_depth=1 if quick else 2,
        pixel_depth=1,
        patch_size=4,
        num_classes=NUM_CLASSES,
    )


# ----------------------------------------------------------------------------- data


def load_data(resolution: int) -> dict[str, np.ndarray]:
    """Train and held-out digits at `resolution`, in 0..16, with their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits: Any = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8) in 0..16
    labels = digits.target.astype(np.int32)
    # Bilinear upsampling (half-pixel centres, edges clamped); stays within 0..16.
    up = jax.image.resize(jnp.asarray(images), (len(images), resolution, resolution), "linear")
    up = np.clip(np.asarray(up), 0.0, MAX_INTENSITY)[:, None]  # (N, 1, R, R)
    x_train, x_test, y_train, y_test = train_test_split(
        up, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    return dict(
        x_train=np.asarray(x_train), y_train=np.asarray(y_train), x_test=np.asarray(x_test), y_test=np.asarray(y_test)
    )


def to_model(x: np.ndarray) -> np.ndarray:
    """0..16 -> [-1, 1]."""
    return (x / (MAX_INTENSITY / 2) - 1.0).astype(np.float32)


def from_model(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..16, clipped."""
    return np.clip((x + 1.0) * (MAX_INTENSITY / 2), 0.0, MAX_INTENSITY).astype(np.float32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Shuffled minibatches, epoch after epoch, forever."""
    rng = np.random.default_rng(seed)
    n = len(x) - len(x) % batch_size if len(x) >= batch_size else len(x)
    while True:
        order = rng.permutation(len(x))[:n]
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


# ----------------------------------------------------------------------------- metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `(N, d)`."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(cov_a cov_b) = sum sqrt(eig(sqrt(cov_a) cov_b sqrt(cov_a))), symmetric PSD.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def evaluate(data: dict[str, np.ndarray], samples: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Classifier accuracy on the samples and Frechet distances in a PCA feature space."""
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    flat = lambda x: x.reshape(len(x), -1) / MAX_INTENSITY  # noqa: E731
    x_train, x_test = flat(data["x_train"]), flat(data["x_test"])
    classifier = SVC(C=10.0, gamma="scale").fit(x_train, data["y_train"])
    heldout = float(np.mean(classifier.predict(x_test) == data["y_test"]))
    predicted = classifier.predict(flat(samples))
    pca = PCA(n_components=16, random_state=SPLIT_SEED).fit(x_train)
    rng = np.random.default_rng(seed)
    real = x_train[rng.choice(len(x_train), size=min(len(samples), len(x_train)), replace=False)]
    test_features = pca.transform(x_test)
    return dict(
        sample_accuracy=float(np.mean(predicted == labels)),
        classifier_heldout_accuracy=heldout,
        sample_accuracy_per_class=[float(np.mean(predicted[labels == c] == c)) for c in range(NUM_CLASSES)],
        frechet_distance=frechet_distance(pca.transform(flat(samples)), test_features),
        frechet_distance_real_vs_real=frechet_distance(pca.transform(real), test_features),
    )


def write_grid(path: pathlib.Path, samples: np.ndarray, labels: np.ndarray, cell: int = 48) -> None:
    """A 10x10 grid: row `c` holds the first ten samples of class `c`; dark ink on white."""
    rows = [samples[labels == c][:NUM_CLASSES] for c in range(NUM_CLASSES)]
    if any(len(r) < NUM_CLASSES for r in rows):
        raise ValueError(f"`samples`: expected at least {NUM_CLASSES} samples of every class.")
    ink = 1.0 - np.concatenate(rows) / (MAX_INTENSITY / 2)  # 0..16 -> white (1) .. black (-1)
    scale = max(1, round(cell / samples.shape[-1]))
    pixeldit_eqx.save_image_grid(ink, path, nrow=NUM_CLASSES, padding=2, pad_value=1.0, scale=scale)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Runs the job with command-line options `argv`; prints and returns the JSON summary."""
    args = parse_args(argv, prog)
    data = load_data(args.resolution)
    config = model_config(args.quick, args.model)
    model_key, train_key, sample_key = jr.split(jr.key(args.seed), 3)
    grounded = args.model == "pixeldit2"
    model = pixeldit_eqx.build(config, "pixeldit2" if grounded else "c2i", key=model_key)
    num_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, pixeldit_eqx.trainable(model))))

    warmup = min(100, args.steps // 10)
    optimizer = train.default_optimizer(args.lr, warmup_steps=warmup, decay_steps=max(args.steps, warmup + 1))
    state = train.init_train_state(model, optimizer, key=train_key)

    def ema_warmup(s):  # the EMA warms up: decay (1 + s) / (10 + s), capped at 0.995
        s = s.astype(jnp.float32)
        return jnp.minimum(0.995, (1.0 + s) / (10.0 + s))

    # Ten steps per compiled call: the job's steps are short, and each call pays for its
    # program's temporary buffer and its dispatch.
    step = train.jit_steps(
        train.make_train_step(
            functools.partial(train.pixeldit2_loss, null_condition_p=0.1) if grounded else train.c2i_loss,
            optimizer,
            ema_decay=ema_warmup,
        ),
        10,
    )
    stream = batches(to_model(data["x_train"]), data["y_train"], args.batch_size, args.seed)
    t0 = time.perf_counter()
    state, losses = train.fit(step, state, stream, num_steps=args.steps, progress=not args.no_progress)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - t0

    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), args.per_class)
    noise = jr.normal(sample_key, (len(labels), 1, args.resolution, args.resolution))

    @eqx.filter_jit
    def generate(model, noise, labels):
        def one(n, y):
            if grounded:  # x-prediction, null label + no grounding for the unconditional branch
                return pixeldit_eqx.sample(
                    model, n, y, num_steps=args.sample_steps, method="heun", guidance=args.guidance
                )
            return flow.sample(
                model,
                n,
                y,
                num_steps=args.sample_steps,
                method="heun",
                guidance=args.guidance,
                null_cond=NUM_CLASSES,
            )

        return jax.vmap(one)(noise, labels)

    t0 = time.perf_counter()
    samples = from_model(np.asarray(generate(state.ema, noise, jnp.asarray(labels))))
    sample_seconds = time.perf_counter() - t0

    out = args.out
    if out.is_dir() or out.suffix == "":
        out = out / "digits_samples.png"
    write_grid(out, samples, labels)
    if args.save_samples is not None:
        args.save_samples.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.save_samples, images=samples, labels=labels)

    summary: dict[str, Any] = dict(
        train_seconds=round(train_seconds, 2),
        sample_seconds=round(sample_seconds, 2),
        **evaluate(data, samples, labels, args.seed),
    )
    summary.update(
        total_seconds=round(time.perf_counter() - _START, 2),
        model=args.model,
        steps=args.steps,
        seed=args.seed,
        final_loss=float(np.mean(losses[-50:])),
        num_params=int(num_params),
        resolution=args.resolution,
        batch_size=args.batch_size,
        sample_steps=args.sample_steps,
        guidance=args.guidance,
        num_samples=int(len(labels)),
        png=str(out),
        config=config,
    )
    for key in ("sample_accuracy", "classifier_heldout_accuracy", "frechet_distance", "frechet_distance_real_vs_real"):
        summary[key] = round(summary[key], 4)
    summary["sample_accuracy_per_class"] = [round(a, 3) for a in summary["sample_accuracy_per_class"]]
    print(json.dumps(summary))
    return summary
