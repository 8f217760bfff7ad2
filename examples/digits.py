"""Train a class-conditional PixelDiT on scikit-learn's handwritten digits and sample it.

The project's main job (`nox -s digits`, or `pixeldit-eqx train-digits` once installed):
a few minutes on a laptop CPU, no download. The job itself lives in
`pixeldit_eqx._digits`, which describes its steps and metrics; this script runs it.

```bash
python examples/digits.py                       # the defaults (how long: docs/performance.md)
python examples/digits.py --steps 3000 --out runs/  --save-samples runs/samples.npz
python examples/digits.py --quick               # a smoke test of the plumbing (mostly compile time)
python examples/digits.py --help                # every option
```
"""

import importlib.util
import pathlib
import sys


if importlib.util.find_spec("pixeldit_eqx") is None:  # a checkout, not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pixeldit_eqx
from pixeldit_eqx._digits import (  # the notebook digits.ipynb imports these from here
    batches as batches,
    evaluate as evaluate,
    from_model as from_model,
    load_data as load_data,
    main as main,
    model_config as model_config,
    to_model as to_model,
)


if __name__ == "__main__":
    # A whole process of its own: keep XLA's per-step buffers in the heap (no per-step
    # page faults; see `pixeldit_eqx.runtime`).
    pixeldit_eqx.runtime.tune_cpu_allocator()
    main()
