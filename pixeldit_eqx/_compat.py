"""What differs between the jax versions the package supports, handled in one place.

XLA renames and removes its compile options from one jaxlib to the next (jax 0.11 dropped
`xla_cpu_use_fusion_emitters`), and asking for an unknown one is an error. Options here
are only ever speed hints, so an unknown one is dropped, and remembered, instead.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax


_UNKNOWN_OPTION = re.compile(r"No such compile option: '([^']+)'")
# Option names this process's XLA refused; found once, then never sent again.
_unknown_options: set[str] = set()


def compile_lowered(lowered: Any, options: Mapping[str, Any]) -> Any:
    """`lowered.compile(compiler_options=options)`, without the options this XLA does not
    know (dropped one by one as it names them, and remembered for the next call)."""
    options = {name: value for name, value in options.items() if name not in _unknown_options}
    while True:
        try:
            return lowered.compile(compiler_options=options)
        except Exception as error:  # jaxlib's runtime error type differs between versions
            match = _UNKNOWN_OPTION.search(str(error))
            if match is None or match.group(1) not in options:
                raise
            _unknown_options.add(match.group(1))
            del options[match.group(1)]


def known_compile_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` without the names this process's XLA does not know, found as
    `compile_lowered` finds them (on an empty program); for `jax.jit(...,
    compiler_options=...)`, which raises on an unknown name instead of dropping it."""
    compile_lowered(jax.jit(lambda: None).lower(), options)
    return {name: value for name, value in options.items() if name not in _unknown_options}


def single_device_sharding(device: Any) -> Any:
    """`jax.sharding.make_single_device_sharding(device)` where jax has it (the class's
    constructor is deprecated from jax 0.12), else `jax.sharding.SingleDeviceSharding(device)`."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    return make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)
