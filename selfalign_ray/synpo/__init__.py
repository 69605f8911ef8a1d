"""SynPO (Self-Boosting LLMs with Synthetic Preference Data, arXiv 2410.06961): a self-prompt generator writes
prompts from keyword lists, a response improver refines the current model's answers, and (refined, initial-model)
answer pairs train the initial model with SimPO on a growing synthetic dataset."""
