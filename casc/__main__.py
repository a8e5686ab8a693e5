"""``python -m casc``: the ``casc`` command."""

import sys

from .cli import main

sys.exit(main())
