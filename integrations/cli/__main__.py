"""``python -m integrations.cli``: the library's commands alone (no Celery app)."""

import sys

from integrations.cli import main

if __name__ == "__main__":
    sys.exit(main())
