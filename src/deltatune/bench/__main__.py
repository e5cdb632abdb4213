"""``python -m deltatune.bench``: the same as ``deltatune bench``."""

from deltatune.bench.step import main

raise SystemExit(main())
