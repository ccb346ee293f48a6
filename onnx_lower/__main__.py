"""``python -m onnx_lower``: see :mod:`onnx_lower.cli`."""

import sys

from .cli import main

sys.exit(main())
