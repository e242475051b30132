"""``python -m fusednorm.bench``: same as the ``fusednorm-bench`` console script."""

from fusednorm.bench.cli import main

# Guarded: multiprocessing's spawn start method (used by ``--kernels``) re-imports the main module in every
# worker, which must not start another benchmark run.
if __name__ == "__main__":
    raise SystemExit(main())
