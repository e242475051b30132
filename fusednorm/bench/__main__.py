"""``python -m fusednorm.bench``: same as the ``fusednorm-bench`` console script."""

from fusednorm.bench.cli import main

raise SystemExit(main())
