"""`python -m caption_cli` runs the same CLI as the `caption-cli` command."""

from caption_cli.cli import main

main()
