"""``python -m cass_plugins`` is ``cass-segment``."""
import sys

from .cli import main

sys.exit(main())
