"""``python -m riffloop.loop demo|evidence``."""

from riffloop.loop._cli import main

raise SystemExit(main())
