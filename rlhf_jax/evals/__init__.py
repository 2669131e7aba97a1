"""L3: evaluations that take parameters, prompts and scorers as arguments: held-out language-modelling loss
(lm), reward models on held-out comparisons (rm), policies against SFT, best-of-n and the ceilings (policy)."""
