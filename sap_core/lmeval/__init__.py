"""Benchmark accuracy through lm-evaluation-harness: the ``sinkscope`` lm-eval model (:mod:`.model`), the built-in
task and offline task loading (:mod:`.tasks`), accuracy tables with paired errors and the :class:`TaskAccuracy`
metric (:mod:`.accuracy`). Above :mod:`sap_core.evaluate` and :mod:`sap_core.compare`, which never import it;
this package file imports nothing, so naming the package does not load lm-eval."""
