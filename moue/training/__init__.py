"""The training system: the engine (DDP, optimizer, schedule), the trainer loop, checkpoints,
and the metrics a run logs. Process groups come from ``parallel`` and are passed in."""
