"""SinkScope's core: attention sinks in diffusion language models, and sink-aware pruning.

``ASSETS`` is the package data that ships inside ``sap_core``: the built-in models
(``assets/models/tiny-dlm``, ``assets/models/tiny-ar``) and texts (``assets/text/``), found through
:mod:`importlib.resources`, so an installed package (``pip install .``) finds them as well as a checkout.
"""

from importlib.resources import files
from pathlib import Path

ASSETS = Path(str(files(__name__) / "assets"))  # sap_core is installed as plain files, never zipped
