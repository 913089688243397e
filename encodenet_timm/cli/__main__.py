"""``python -m encodenet_timm.cli``: the ``encodenet`` command (`main`), its exit code the process's."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
