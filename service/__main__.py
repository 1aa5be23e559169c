"""`python -m service serve ...` (same as the `inference-wrapper` console script)."""

import sys

from service.cli import main

sys.exit(main())
