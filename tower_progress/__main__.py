"""``python -m tower_progress`` runs the command line."""

import sys

from tower_progress.cli import main

sys.exit(main())
