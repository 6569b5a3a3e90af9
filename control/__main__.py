"""``python -m control``: the command line behind ./pacs."""

from control.cli import main

main(prog_name="pacs")
