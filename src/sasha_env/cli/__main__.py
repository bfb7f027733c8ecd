"""``python -m sasha_env.cli``: the ``sasha`` console script (``--jobs`` helpers run it so)."""

import sys

from . import main

sys.exit(main())
