"""``python -m holdall`` is the same as the ``holdall`` command."""

import sys

from holdall.cli.main import main

sys.exit(main())
