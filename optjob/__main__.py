"""``python -m optjob`` is the ``optjob`` command."""

from optjob.cli import main

main()
