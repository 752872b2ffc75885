"""`python -m kvtier.service --config FILE`: the store service without the kvtier CLI."""

import sys

from kvtier.service.server import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(None))
