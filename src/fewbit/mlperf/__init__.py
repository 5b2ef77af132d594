"""MLPerf-style measurement: inference through the real LoadGen (:mod:`fewbit.mlperf.inference` and the modules it
uses: :mod:`~fewbit.mlperf.settings`, :mod:`~fewbit.mlperf.backends`, :mod:`~fewbit.mlperf.logs`) and time to
quality for training (:mod:`fewbit.mlperf.training`).

Nothing is imported eagerly: ``import fewbit.mlperf`` costs nothing, and LoadGen is imported only by the modules
that drive it.
"""
