"""`python -m mara_serve.engine.native [DIR]`: compile the portable builds of the native decode
kernel (into the package's prebuilt/ directory by default), for images without a compiler."""

import sys
from pathlib import Path

from mara_serve.engine.native import prebuild

if __name__ == "__main__":
    for path in prebuild(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(path)
