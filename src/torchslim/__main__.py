"""``python -m torchslim`` (and ``torchrun --nproc_per_node N -m torchslim run recipe.yaml``)."""

from .app.cli import main

raise SystemExit(main())
