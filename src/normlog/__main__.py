"""`python -m normlog report|plot ...`, the same as the `normlog` console script."""

import sys

from normlog.report import main

sys.exit(main())
