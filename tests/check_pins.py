"""Fails unless every package pinned with `==` in a constraints file is installed at that
version (so `nox -s tests-oldest` runs what it says it runs).

    python tests/check_pins.py tests/constraints-oldest.txt
"""

import sys
from importlib import metadata


def main(path: str) -> None:
    wrong = []
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, pinned = line.partition("==")
        try:
            installed = metadata.version(name.strip())
        except metadata.PackageNotFoundError:
            installed = None
        if installed != pinned.strip():
            wrong.append(f"{name.strip()}: pinned {pinned.strip()}, installed {installed}")
    if wrong:
        raise SystemExit("check_pins: " + "; ".join(wrong))
    print(f"check_pins: every pin of {path} is installed")


if __name__ == "__main__":
    main(sys.argv[1])
