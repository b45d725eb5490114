"""``python -m fastmmt``: the command-line interface."""
from fastmmt.cli import main

raise SystemExit(main())
