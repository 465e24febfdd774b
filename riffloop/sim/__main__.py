"""``python -m riffloop.sim demo|evidence``."""

from riffloop.sim._cli import main

raise SystemExit(main())
