"""``python -m safeft`` = the ``safeft`` command."""

import sys

from safeft.cli import main

sys.exit(main())
