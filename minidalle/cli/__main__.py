"""`python -m minidalle.cli`: the same as the `minidalle` command."""

from minidalle.cli import main

raise SystemExit(main())
