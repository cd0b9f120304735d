"""``python -m vlexport.cli``."""

import sys

from vlexport.cli import main

sys.exit(main())
