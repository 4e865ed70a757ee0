"""python -m jaxtune COMMAND ...: the same as the `jaxtune` command (jaxtune/cli.py)."""

import sys

from jaxtune.cli import main

sys.exit(main())
