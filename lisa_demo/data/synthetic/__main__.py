"""`python -m lisa_demo.data.synthetic`: write a synthetic set (see the package doc)."""

import sys

from lisa_demo.data.synthetic import main

sys.exit(main())
