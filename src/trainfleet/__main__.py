"""`python -m trainfleet` is the same as the `trainfleet` console script."""

import sys

from trainfleet.cli import main

sys.exit(main())
