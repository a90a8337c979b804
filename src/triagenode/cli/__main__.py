"""``python -m triagenode.cli``: the same as the ``triagenode`` command."""

import sys

from triagenode.cli import main

sys.exit(main())
