"""``python -m slitterd``: the same as the ``slitterd`` console script."""

from slitterd.main import main

raise SystemExit(main())
