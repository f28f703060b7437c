"""``python -m deepcad_chunked``: the ``deepcad-chunked`` command."""

import sys

from deepcad_chunked.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
