"""``python -m cryosiam_nb.pl.curation``: serve the explorer (see :func:`.server.main`)."""

from cryosiam_nb.pl.curation.server import main

main()
