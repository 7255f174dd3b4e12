"""dpolab: DPO on a small chat model on one GPU, built on TRL's DPOTrainer."""

__version__ = "0.1.0"
