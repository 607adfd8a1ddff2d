"""``python -m lrmt_fast ...`` == ``lrmt ...``."""
import sys

from .cli import main

sys.exit(main())
