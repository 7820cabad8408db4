"""`python -m camelid ...` is `camelid ...` (and so `torchrun -m camelid train ...` works)."""

import sys

from camelid.cli.main import main

sys.exit(main())
