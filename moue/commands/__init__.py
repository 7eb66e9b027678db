"""What each command does (``moue.cli`` parses their arguments): pretrain, eval, export, and
the model alone on one process for the commands that need only weights."""
