"""``python -m sap_core``: the SinkScope command line (see :mod:`sap_core.cli`)."""

from sap_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
