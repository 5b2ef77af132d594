"""Training in any precision: the loop, loss scalers, checkpoints and gradient statistics."""

from fewbit.train.checkpoint import CheckpointError
from fewbit.train.loop import TrainResult, shard, train
from fewbit.train.qat import qat
from fewbit.train.scaler import DynamicScaler, LogMaxScaler, LossScaleCollapse, StaticScaler

__all__ = ["CheckpointError", "DynamicScaler", "LogMaxScaler", "LossScaleCollapse", "StaticScaler", "TrainResult",
           "qat", "shard", "train"]
