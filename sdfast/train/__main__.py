"""`python -m sdfast.train finetune ...` (and `accelerate launch -m sdfast.train finetune ...`)."""
import sys

from .cli import main

sys.exit(main())
