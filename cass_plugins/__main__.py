"""``python -m cass_plugins`` is ``cass-segment``."""
import sys

from cass_plugins.cli.segment import main

sys.exit(main())
