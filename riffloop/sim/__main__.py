"""``python -m riffloop.sim demo|evidence|soak``."""

import sys

if sys.argv[1:2] == ["soak"]:  # the soak needs no model: skip the torch-bound imports
    from riffloop.sim._soak import soak

    raise SystemExit(soak(sys.argv[2:]))

from riffloop.sim._cli import main

raise SystemExit(main())
