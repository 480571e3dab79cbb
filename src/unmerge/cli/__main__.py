"""`python -m unmerge.cli`."""

import sys

from unmerge.cli import main

sys.exit(main())
