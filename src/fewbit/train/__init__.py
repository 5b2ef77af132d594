"""Training in any precision: the loop, its precision policy, callbacks, loss scalers, checkpoints and gradient
statistics."""

from fewbit.train.callbacks import (
    Callback,
    Checkpoints,
    Evaluate,
    GradientStats,
    MetricsLog,
    MLPerfLog,
    OnStep,
    ProgressBar,
    StopAtTarget,
    TrainState,
)
from fewbit.train.checkpoint import CheckpointError
from fewbit.train.loop import AllStepsSkipped, TrainResult, shard, train
from fewbit.train.precision import MasterWeights, Precision
from fewbit.train.qat import qat
from fewbit.train.scaler import DynamicScaler, LogMaxScaler, LossScaleCollapse, StaticScaler

__all__ = ["AllStepsSkipped", "Callback", "CheckpointError", "Checkpoints", "DynamicScaler", "Evaluate",
           "GradientStats", "LogMaxScaler", "LossScaleCollapse", "MLPerfLog", "MasterWeights", "MetricsLog", "OnStep",
           "Precision", "ProgressBar", "StaticScaler", "StopAtTarget", "TrainResult", "TrainState", "qat", "shard",
           "train"]
