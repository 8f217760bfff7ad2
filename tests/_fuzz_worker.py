"""Loads mutated checkpoint files under a memory limit, one case at a time.

Run by `test_fuzz.py` as `python -m tests._fuzz_worker <plan.json>` (a subprocess, so
that a crash, a hang or an exhausted address space is observed from outside). The plan
names the files, the loader of each and the limits. For every case the worker writes one
JSON line to the plan's `log` *before* loading ("start") and one after ("done", with the
outcome), so the parent can name the case that crashed the process.

Outcomes: `"loaded"`, or `"error"` with the exception's type; the parent decides which
types are documented. A case that runs past `case_timeout_s` is stopped by SIGALRM and
reported as `"timeout"`.
"""

import hashlib
import json
import os
import resource
import signal
import sys
import time


class CaseTimeout(BaseException):
    """Raised by SIGALRM in a case that ran too long (a BaseException: no loader catches it)."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def digest(result) -> str:
    """The sha256 of every array a load returned (dtype, shape, bytes), in a fixed order."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    h = hashlib.sha256()
    stack = [result]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x[k] for k in sorted(x, key=repr, reverse=True))
        elif isinstance(x, list | tuple):
            stack.extend(reversed(x))
        elif isinstance(x, np.ndarray | np.generic):
            x = np.asarray(x)
            h.update(f"{x.dtype.str}{x.shape}".encode() + x.tobytes())
        elif isinstance(x, eqx.Module):
            for leaf in jax.tree.leaves(eqx.filter(x, eqx.is_array)):
                if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    leaf = jr.key_data(leaf)
                stack.append(np.asarray(leaf))
    return h.hexdigest()


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    limit = plan["memory_limit_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)

    # The loaders, imported under the limit.
    import pixeldit_eqx as px
    from pixeldit_eqx import train
    from pixeldit_eqx._torch_pickle import load_torch_file

    config = plan["config"]

    def like_state():
        import equinox as eqx
        import jax.random as jr

        def make():
            model = px.build(config, "c2i", key=jr.key(0))
            return train.init_train_state(model, train.default_optimizer(1e-3), key=jr.key(1))

        return eqx.filter_eval_shape(make)

    skeleton = like_state() if any(c["loader"] == "checkpoint" for c in plan["cases"]) else None
    loaders = {
        "torch": load_torch_file,
        "reference": lambda p: px.load_reference(p, config, "c2i"),
        "model": train.load_model,
        "checkpoint": lambda p: train.load_checkpoint(p, skeleton),
    }
    canary = plan["canary"]
    with open(plan["log"], "w", buffering=1) as log:
        for case in plan["cases"]:
            log.write(json.dumps({"event": "start", "name": case["name"]}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            signal.alarm(plan["case_timeout_s"])
            start = time.process_time()
            try:
                outcome = {"outcome": "loaded", "digest": digest(loaders[case["loader"]](case["path"]))}
            except CaseTimeout:
                outcome = {"outcome": "timeout"}
            except Exception as e:
                outcome = {"outcome": "error", "type": type(e).__name__, "message": str(e)[:300]}
            finally:
                signal.alarm(0)
            outcome |= {
                "event": "done",
                "name": case["name"],
                "canary": os.path.exists(canary),
                "cpu_s": time.process_time() - start,
            }
            log.write(json.dumps(outcome) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
