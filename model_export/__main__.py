"""`python -m model_export ...` is `privscore-model ...`."""

import sys

from model_export.cli import main

sys.exit(main())
