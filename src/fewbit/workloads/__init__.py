"""Reference workloads on offline data (data, model, metric, configs). Work in progress: the number-phrase corpus."""
