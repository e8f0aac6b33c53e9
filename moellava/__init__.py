"""moellava: LLaVA vision-language models with a sparsely upcycled Mixture-of-Experts LLM."""

__version__ = "0.1.0"
