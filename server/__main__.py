"""python -m server: the same as gpt-serve."""

import sys

from .cli import main

sys.exit(main())
