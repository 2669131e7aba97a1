"""Every loss and estimator of the RLHF pipeline, as small pure functions of arrays.

Each function is jit-able, computes in float32, takes masks and hyperparameters as explicit keyword
arguments, and is tested against a NumPy reference in tests/losses_test.py without any model.

Shapes are named by their axes: b batch (prompts or episodes), t time (tokens), v vocabulary, k responses per
prompt (padded to a maximum), p pairs per prompt (k*(k-1)/2), n flattened pairs.

Modules: core (masked sums), lm, ranking, rl.

Sections
--------
Language modelling (pretrain, SFT, PPO-ptx)
  `next_token_loss` is the masked mean cross-entropy. SFT passes a mask over response tokens only.
  PPO-ptx (InstructGPT, arXiv 2203.02155, eq. 2) maximises
      E[r(x,y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi_RL(x)],
  so the quantity to minimise is  ppo_policy_loss + vf_coef * ppo_value_loss + gamma * ptx_loss  where
  `ptx_loss` is `next_token_loss` on a batch of pretraining text. gamma = 0 is plain "PPO".

Reward model (InstructGPT eq. 1)
  `ranking_loss` keeps the K responses of a prompt together: -1/C(K,2) sum_{w>l} log sigmoid(r_w - r_l).
  `pairwise_loss` treats pairs as independent examples (the ablation InstructGPT found to overfit);
  `expand_pairs` + `grouped_pair_weights` turn K-way rankings into such pairs so that both modes give the same
  loss when weighted alike. `rm_calibration` is the expected calibration error of sigmoid(r_w - r_l).
  `rating_regression_loss` regresses centred scores onto per-prompt Elo ratings of a ranking (rm.target).

PPO for language models (Ziegler et al. arXiv 1909.08593; openai/lm-human-preferences; arXiv 2403.17031)
  `kl_penalized_rewards` -> `whiten(..., shift_mean=False)` -> `compute_gae` -> `whiten` advantages per
  minibatch -> `ppo_policy_loss`, `ppo_value_loss`. `a2c_policy_loss`/`a2c_value_loss` are the A2C
  alternative (Gopher, Sparrow). `update_kl_controller` is the adaptive KL coefficient; a fixed coefficient is
  simply never updated. `best_of_n_kl` is the analytic KL of the best-of-n baseline.
"""

# One namespace for every loss (`losses.ranking_loss`, `losses.compute_gae`), as optax exports its transforms.
from rlhf_jax.losses.core import Metrics, masked_mean, masked_sum
from rlhf_jax.losses.lm import lm_loss, next_token_loss, ptx_loss
from rlhf_jax.losses.ranking import (expand_pairs, grouped_pair_weights, pairwise_loss, ranking_loss,
                                     rating_regression_loss, rm_calibration)
from rlhf_jax.losses.preference import preference_loss, preference_pairs_bkk
from rlhf_jax.losses.rl import (AGGREGATIONS, KLControllerState, a2c_policy_loss, a2c_value_loss, aggregate,
                                best_of_n_kl, check_whitenable, compute_gae, entropy_from_logits, explained_variance,
                                group_advantages, k3_kl, kl_penalized_rewards, leave_one_out_advantages,
                                ppo_policy_loss, ppo_value_loss, update_kl_controller, whiten)

__all__ = [
    "AGGREGATIONS",
    "KLControllerState",
    "Metrics",
    "a2c_policy_loss",
    "a2c_value_loss",
    "aggregate",
    "best_of_n_kl",
    "check_whitenable",
    "compute_gae",
    "entropy_from_logits",
    "expand_pairs",
    "explained_variance",
    "group_advantages",
    "grouped_pair_weights",
    "k3_kl",
    "kl_penalized_rewards",
    "leave_one_out_advantages",
    "lm_loss",
    "masked_mean",
    "masked_sum",
    "next_token_loss",
    "pairwise_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_loss",
    "preference_pairs_bkk",
    "ptx_loss",
    "ranking_loss",
    "rating_regression_loss",
    "rm_calibration",
    "update_kl_controller",
    "whiten",
]
