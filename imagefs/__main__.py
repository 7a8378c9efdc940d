"""``python -m imagefs``: the same as the ``imagefs`` command."""

import sys

from imagefs.cli import main

sys.exit(main())
