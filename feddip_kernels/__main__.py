"""`python -m feddip_kernels`: same as the `feddip` command."""

from .cli import main

raise SystemExit(main())
