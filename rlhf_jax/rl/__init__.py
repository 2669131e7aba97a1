"""L3: the RL machinery shared by the RL stage's algorithms: the rollout (sample, score, reference log-probs,
values, advantages) and the update (epochs x minibatches, the policy loss chosen by name)."""
