"""Kills writers with SIGKILL at random points, and runs two writers at once.

Run by `test_checkpoint_safety.py` as `python -m tests._writer <plan.json>`. For each
writer (`save_model`, `save_checkpoint`, `save_safetensors`) it writes the files of two
different states, A and B, once whole (`A.ref`, `B.ref`); then, round after round, puts
A at the target, forks a child that saves B there and kills it with SIGKILL after a
random delay (one in each slice of up to 1.5 times the median of three whole saves,
the first at once and the last after two whole saves), and records whether
the target is byte for byte A or B (anything else is a mix or a damaged file). Then it
forks two children saving A and B to one path at once, and records the same. The
children only touch numpy arrays and files (the states hold numpy leaves), never the
JAX runtime.
"""

import json
import os
import random
import shutil
import signal
import sys
import time
import warnings


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    import pixeldit_eqx as px
    from pixeldit_eqx import train

    warnings.simplefilter("ignore")  # JAX warns about `os.fork`; the children never use it.
    folder = plan["folder"]
    rng = random.Random(plan["seed"])

    def numpy_leaves(tree):
        return jax.tree.map(lambda x: np.asarray(x) if eqx.is_array(x) else x, tree)

    def model(seed):
        return px.build(plan["config"], "c2i", key=jr.key(seed))

    def state(seed):
        s = train.init_train_state(model(seed), train.default_optimizer(1e-3), key=jr.key(seed))
        return numpy_leaves(train._keys_to_data(s))

    models = [numpy_leaves(model(0)), numpy_leaves(model(1))]
    states = [state(0), state(1)]
    writers = {
        "model": lambda path, i: train.save_model(path, models[i]),
        "checkpoint": lambda path, i: train.save_checkpoint(path, states[i]),
        "safetensors": lambda path, i: px.save_safetensors(path, px.state_dict(models[i])),
    }

    def in_child(write, path, i):
        pid = os.fork()
        if pid == 0:
            try:
                write(path, i)
            finally:
                os._exit(0)
        return pid

    summary = {}
    for name, write in writers.items():
        refs = []
        for i in range(2):
            ref = os.path.join(folder, f"{name}-{'AB'[i]}.ref")
            os.waitpid(in_child(write, ref, i), 0)
            with open(ref, "rb") as f:
                refs.append(f.read())
        target = os.path.join(folder, f"{name}.target")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            os.waitpid(in_child(write, target, 1), 0)
            times.append(time.perf_counter() - start)
        whole = sorted(times)[1]  # the median: one slow or fast save does not set the range
        outcomes = []
        # Random delays up to 1.5 whole saves (on a loaded machine a save can take longer
        # than the ones timed), one in each of `kills` equal slices of that range, so that
        # some land early in the save whatever the draw; the first kill comes at once and
        # the last after 2 whole saves, so that kills land both before and after the
        # replacement.
        kills = plan["kills"]
        delays = [1.5 * whole * (k + rng.random()) / kills for k in range(kills)]
        delays[0], delays[-1] = 0.0, 2.0 * whole
        for delay in delays:
            shutil.copyfile(os.path.join(folder, f"{name}-A.ref"), target)
            pid = in_child(write, target, 1)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with open(target, "rb") as f:
                data = f.read()
            outcomes.append("A" if data == refs[0] else "B" if data == refs[1] else "mix")
        concurrent = []
        for _ in range(plan["concurrent"]):
            pids = [in_child(write, target, i) for i in (0, 1)]
            for pid in pids:
                os.waitpid(pid, 0)
            with open(target, "rb") as f:
                data = f.read()
            concurrent.append("A" if data == refs[0] else "B" if data == refs[1] else "mix")
        leftovers = [n for n in os.listdir(folder) if n.startswith(f".{name}.target.")]
        summary[name] = {
            "kills": outcomes,
            "concurrent": concurrent,
            "leftover_temporaries": len(leftovers),
            "whole_write_s": whole,
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
