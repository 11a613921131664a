"""Training: a DC-AE on all domains' images, then a Jodi DiT with the paper's role sampling (see :mod:`.trainer`)."""

from .trainer import (
    CHECKPOINT_FORMAT, CONDITION, GENERATE, IGNORE, TASKS, TINY_DCAE, TINY_DIT, DataConfig, Deadline, Distributed,
    Trainer, TrainConfig, TrainResult, build_parser, flow_matching_loss, lr_scale, main_train, make_batches,
    read_training_state, sample_roles, sample_sigmas, save_safetensors, train,
)  # fmt: skip
