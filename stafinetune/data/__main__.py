"""``python -m stafinetune.data`` (and ``torchrun -m stafinetune.data``): the preprocessing CLI."""

import sys

from stafinetune.data.preprocess import main

sys.exit(main())
