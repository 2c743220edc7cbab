"""Allow ``python -m klaviyo_bridge``."""

import sys

from .cli import main

sys.exit(main())
