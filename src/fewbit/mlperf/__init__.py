"""MLPerf-style measurement: time to quality for training (:mod:`fewbit.mlperf.training`)."""
