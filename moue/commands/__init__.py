"""What the commands share that is not a library's concern: the model alone on one process."""
