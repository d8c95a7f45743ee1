"""``python -m sap_core.benchmark``: lm-eval's own command line with SinkScope's model ``sinkscope`` registered
(:func:`sap_core.lmeval.model.main`; the lm-eval code lives in :mod:`sap_core.lmeval`)."""

from sap_core.lmeval.model import main

if __name__ == "__main__":
    raise SystemExit(main())
