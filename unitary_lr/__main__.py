"""``python -m unitary_lr`` is the ``unitary-lr`` command."""

import sys

from .cli import main

sys.exit(main())
