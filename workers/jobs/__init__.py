"""Job execution: claim, validate, run the training subprocess, checkpoint, publish."""
