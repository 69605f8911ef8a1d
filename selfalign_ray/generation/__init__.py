"""Ray Data generation machinery shared by SAO and SynPO: engine actor pools and resumable chunk writing."""
