"""``python -m cryosiam_nb.cli``: the ``cryosiam-nb`` command."""

from cryosiam_nb.cli import main

raise SystemExit(main())
