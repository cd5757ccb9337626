"""fedbone-med: FedBone federated multi-task learning for ophthalmic imaging."""

__version__ = "0.1.0"
