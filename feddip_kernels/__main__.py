"""`python -m feddip_kernels`: same as the `feddip` command."""

from .fl.cli import main

raise SystemExit(main())
