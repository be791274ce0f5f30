"""Run the command line with ``python -m pulldocker``."""

from .cli import main

raise SystemExit(main())
