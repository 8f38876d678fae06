"""`python -m mara_serve ...` is the `mara` command."""

import sys

from mara_serve.cli.main import main

sys.exit(main())
