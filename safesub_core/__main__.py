"""`python -m safesub_core ...`: see safesub_core/cli.py."""
import sys

from safesub_core.cli import main

sys.exit(main())
