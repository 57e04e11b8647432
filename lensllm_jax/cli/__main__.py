"""``python -m lensllm_jax.cli``: the ``lensllm`` command."""

import sys

from lensllm_jax.cli.main import main

sys.exit(main())
