"""``python -m sdlora`` (also what ``torchrun -m sdlora`` runs)."""

import sys

from .cli import main

sys.exit(main())
