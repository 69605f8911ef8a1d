"""selfalign-ray: Ray-native self-alignment (SAO, SynPO) with SimPO on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
