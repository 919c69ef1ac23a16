"""Tolerances for float32 results checked against a float64 reference of the same computation.

The model of float32 error (Higham, Accuracy and Stability of Numerical Algorithms, ch. 2-3): each
operation returns its exact result times (1 + δ) with |δ| ≤ u = 2**-24, a sum or inner product of k
terms rounds k times (error ≤ k·u times the sum of the terms' magnitudes), and to first order the
roundings along a chain of operations add up. So a float32 result is within
    (roundings on its longest path from the inputs) · u · (size of the quantities combined)
of the exact one, which float64 stands in for (its own error is 2**-29 times smaller). A backward
pass retraces its forward path, so a gradient's budget counts that path twice. These are worst-case
bounds: observed errors are typically ten to a hundred times smaller (rounding errors of random sign
partly cancel), yet a wrong formula, a missing factor or a precision loss that grows with the size of
the logits (which a budget never covers) is far outside them.
"""

import torch

UNIT_ROUNDOFF = 2.0 ** -24  # float32: 24-bit significand, round to nearest


def loss_roundings(vocab_size, num_positions):
    """A divergence over V tokens summed over N positions: the log-softmax's sum of V exponentials
    (V), its max, log and subtraction (3), the term p·(log p − log q) (3; the JSD's mixture 2 more),
    the sum over the vocabulary (V) and over positions (N)."""
    return 2 * vocab_size + num_positions + 8


def decoder_roundings(config, seq_len):
    """A Llama-style decoder's forward pass to its logits. Per layer: RMSNorm (H sums + 3) twice, the
    q/k/v projection (H), attention scores (head dim), their softmax (seq + 3), the weighted sum of
    values (seq), the output projection (H), gate/up projection (H), SiLU and product (5), the down
    projection (intermediate), two residual adds, and 4 for constant scalings some architectures
    add (Granite's multipliers); then the final RMSNorm and the output layer (H)."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    per_layer = (2 * (hidden + 3) + hidden + head_dim + (seq_len + 3) + seq_len + hidden + hidden
                 + 5 + intermediate + 2 + 4)
    return config.num_hidden_layers * per_layer + (hidden + 3) + hidden


def log_prob_scale(*logits, temperature=1.0):
    """The largest finite |log-probability| of these (N, V) logits at this temperature: the size of
    what a log-softmax combines (computed on logits/T − max, whose entries are no larger than
    their |log-probability|). A divergence's terms weigh two such values with probabilities that
    sum to 1, so one position's divergence combines at most twice this much."""
    scale = 0.0
    for rows in logits:
        log_probs = torch.log_softmax(rows.detach().double() / temperature, dim=-1)
        finite = log_probs[torch.isfinite(log_probs)]
        scale = max(scale, finite.abs().max().item() if finite.numel() else 0.0)
    return scale


def assert_close(got, reference, roundings, scale=None, what="value"):
    """|got − reference| ≤ roundings · u · scale everywhere (scale: the largest |reference| entry
    unless given: a normwise bound, as an element can be small by cancellation)."""
    reference = reference.double()
    if scale is None:
        scale = reference.abs().max().item()
    bound = roundings * UNIT_ROUNDOFF * scale
    error = (got.double() - reference).abs().max().item()
    assert error <= bound, (f"{what}: float32 error {error:.3g} exceeds {roundings} roundings "
                            f"({bound:.3g} at scale {scale:.3g}; {error / bound:.1f}x the budget)")

