"""`python -m streamsynth ...` is the `streamsynth` command."""

import sys

from .cli import main

sys.exit(main())
