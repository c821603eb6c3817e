"""``python -m flowalign ...`` (and ``accelerate launch -m flowalign train ...``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
