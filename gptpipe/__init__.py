"""gptpipe: G.pt (Peebles et al. 2022) as a pipeline. See docs/architecture.md for the map."""
