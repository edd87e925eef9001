"""`python -m dynts ...` runs the `dynts` command."""

import sys

from dynts.cli.main import main

sys.exit(main())
