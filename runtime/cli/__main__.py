"""``python -m runtime.cli ...`` is the ``tiermem`` command (where no entry script is)."""

import sys

from runtime.cli.app import main

sys.exit(main())
