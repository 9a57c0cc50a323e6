"""The training engine: distributed environment, DeepSpeed configuration and engine, LARS and schedules,
checkpointing, export, and the training loop."""
