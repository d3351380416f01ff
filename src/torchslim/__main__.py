"""``python -m torchslim`` (and ``torchrun --nproc_per_node N -m torchslim run recipe.yaml``)."""

from .cli import main

raise SystemExit(main())
