"""Machine checks run as commands (``python -m fastmmt.tools.<name>``), not imported by the library."""
