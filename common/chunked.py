"""Memory-bounded distillation loss: output layers applied chunk by chunk, at supervised positions.

At real vocabularies the loss, not the model, decides memory. With Llama-3's 128,256 tokens one
float32 logits tensor for 2,048 positions is 1 GiB, and a plain forward + backward keeps several
(student and teacher logits, both log-softmaxes, the KL's terms, the gradient). Here the student's
and the teacher's output layers (lm_heads) are applied to `chunk_size` positions at a time, each
chunk's loss and its gradient are computed at once, and the chunk's logits are freed before the
next one, so about one chunk of logits is alive at any moment, in the forward and in the backward.

The gradients are computed in the forward pass (as Liger-Kernel's fused losses do): each chunk's
d loss / d logits has a closed form (see `_chunk_loss_and_grad`), which is pushed through the
linear layer by hand:
    d loss / d hidden_chunk  = g @ W          (g = d loss / d logits_chunk, shape (C, V))
    d loss / d W            += gᵀ @ hidden_chunk
so the backward pass only scales the stored gradients by the incoming one. The definitions are
those of `common.losses` (same directions, T² scaling, 0·log 0 = 0); tests/test_chunked.py checks
values and gradients against autograd through `common.losses.distillation_loss`.
"""

import math

import torch
import torch.nn.functional as F

from common.losses import KDObjective, cross_entropy

# One chunk's float32 logits take about this much; the chunk's other temporaries (the other model's
# logits, two log-softmaxes, the KL's terms, the gradient) are a small multiple of it.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Divergences whose gradient _chunk_loss_and_grad writes in closed form; the rest use autograd.
_CLOSED_FORM_KINDS = ("forward", "reverse", "jsd")


def auto_chunk_size(vocab_size, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Positions per chunk so one chunk of float32 logits takes about `chunk_bytes`.

    256 at a 128,256-token vocabulary, 1,048 at 32,000; at least 1, a multiple of 8 above 8.
    """
    rows = max(1, chunk_bytes // (4 * vocab_size))
    return rows - rows % 8 if rows > 8 else rows


def chunked_kd_loss(student_hidden, student_weight, target_ids, vocab_size, *, student_bias=None,
                    teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                    teacher_logits=None, kind="forward", temperature=1.0, beta=0.5, alpha=0.0,
                    skew=0.1, objective=None, chunk_size=0, compute_dtype=None,
                    teacher_compute_dtype=None):
    """Σ over N supervised positions of (1 - alpha)·T²·D(T) + alpha·CE, one chunk of logits at a time.

    Inputs, for N supervised positions (those whose next token is supervised):
    - student_hidden (N, H): the student's final hidden states (the output layer's input);
      student_weight (V_s, H) and optional student_bias (V_s,): its output layer, V_s ≥ vocab_size.
    - the teacher, either as teacher_hidden (N, H_t) + teacher_weight (V_t, H_t) (+ teacher_bias),
      whose logits are then made chunk by chunk too, or as ready teacher_logits (N, V_t).
    - target_ids (N,): the tokens the data says come next (for the cross-entropy term).
    - vocab_size: only ids [0, vocab_size) are compared; rows of padded embedding matrices beyond
      it are not part of either distribution (and get zero gradient).
    - objective: a common.losses.KDObjective (divergence D, T, beta, skew, alpha), or else the
      same as keywords kind / temperature / beta / alpha / skew (forward = KL(p_t ‖ p_s),
      reverse = KL(p_s ‖ p_t), jsd = generalized JSD(beta), skew_* = DistiLLM's skew KL).
    - chunk_size: positions per chunk; ≤ 0 picks `auto_chunk_size(vocab_size)`.
    - compute_dtype / teacher_compute_dtype: dtype of each output layer's matmul (None = its
      weight's dtype; pass bfloat16 under bf16 mixed precision, as autocast would). Log-softmax
      and the loss are float32 whatever this is.

    Returns (loss_sum, {"kd": Σ D·T², "ce": Σ CE}); loss_sum carries gradients to student_hidden,
    student_weight and student_bias; the stats are detached. N = 0 gives zeros, not NaN. Backward
    may run once per call (the gradients are computed in the forward pass and handed over).
    """
    if objective is None:
        objective = KDObjective(kind, temperature, beta, skew, alpha)
    if (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("pass either teacher_logits or teacher_hidden with teacher_weight")
    num_positions = student_hidden.shape[0]
    teacher_rows = teacher_logits if teacher_logits is not None else teacher_hidden
    if teacher_rows.shape[0] != num_positions or target_ids.shape != (num_positions,):
        raise ValueError(f"student ({num_positions}), teacher ({teacher_rows.shape[0]}) and "
                         f"targets ({tuple(target_ids.shape)}) must cover the same positions")
    settings = {"vocab_size": vocab_size, "objective": objective,
                "chunk_size": chunk_size if chunk_size > 0
                else auto_chunk_size(vocab_size),
                # Inside forward() grad mode is always off; whether the caller wants gradients
                # (not under torch.no_grad: evaluation) must be read here.
                "grad_enabled": torch.is_grad_enabled(),
                "compute_dtype": compute_dtype or student_weight.dtype,
                "teacher_compute_dtype": teacher_compute_dtype or (
                    teacher_weight.dtype if teacher_weight is not None else None)}
    loss, kd, ce = _ChunkedKDLoss.apply(student_hidden, student_weight, student_bias,
                                        teacher_hidden, teacher_weight, teacher_bias,
                                        teacher_logits, target_ids, settings)
    return loss, {"kd": kd, "ce": ce}


def _output_layer(weight, bias, vocab_size, dtype):
    """The first vocab_size rows of an output layer, in the matmul dtype (cast once, not per chunk)."""
    weight = weight.detach()[:vocab_size].to(dtype)
    return weight, None if bias is None else bias.detach()[:vocab_size].to(dtype)


class _ChunkedKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                teacher_bias, teacher_logits, target_ids, settings):
        vocab_size, objective = settings["vocab_size"], settings["objective"]
        dtype, chunk_size = settings["compute_dtype"], settings["chunk_size"]
        needs_hidden_grad, needs_weight_grad, needs_bias_grad = (
            needed and settings["grad_enabled"] for needed in ctx.needs_input_grad[:3])
        needs_grad = needs_hidden_grad or needs_weight_grad or needs_bias_grad
        weight, bias = _output_layer(student_weight, student_bias, vocab_size, dtype)
        teacher_layer = None if teacher_logits is not None else _output_layer(
            teacher_weight, teacher_bias, vocab_size, settings["teacher_compute_dtype"])

        device = student_hidden.device
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = torch.zeros_like(student_hidden) if needs_hidden_grad else None
        # float32 accumulators: a sum of per-chunk products, rounded once at the end.
        grad_weight = (torch.zeros_like(student_weight, dtype=torch.float32)
                       if needs_weight_grad else None)
        grad_bias = (torch.zeros_like(student_bias, dtype=torch.float32)
                     if needs_bias_grad else None)
        # Autocast would recast inside this function; every dtype here is chosen explicitly.
        with torch.autocast(device.type, enabled=False):
            for start in range(0, student_hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                hidden = student_hidden[rows].detach().to(dtype)
                student_logits = F.linear(hidden, weight, bias)
                if teacher_logits is None:
                    teacher_chunk = F.linear(teacher_hidden[rows].detach().to(
                        settings["teacher_compute_dtype"]), *teacher_layer)
                else:
                    teacher_chunk = teacher_logits[rows, :vocab_size].detach()
                kd, ce, grad_logits = _chunk_loss_and_grad(student_logits, teacher_chunk,
                                                           target_ids[rows], settings, needs_grad)
                del teacher_chunk, student_logits  # the next chunk must not meet these
                kd_sum += kd
                ce_sum += ce
                if grad_logits is None:
                    continue
                grad_logits = grad_logits.to(dtype)
                if needs_hidden_grad:
                    grad_hidden[rows] = (grad_logits @ weight).to(grad_hidden.dtype)
                if needs_weight_grad:
                    if dtype == torch.float32:
                        grad_weight[:vocab_size].addmm_(grad_logits.T, hidden)
                    else:  # a low-precision product, accumulated in float32
                        grad_weight[:vocab_size] += grad_logits.T @ hidden
                if needs_bias_grad:
                    grad_bias[:vocab_size] += grad_logits.float().sum(dim=0)
                del grad_logits
        loss = objective.combine(kd_sum, ce_sum)
        ctx.gradients = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype))
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:
            raise RuntimeError("chunked_kd_loss supports one backward pass per call: its "
                               "gradients are computed in the forward pass and handed over once")
        # d(grad_loss * loss)/dx = grad_loss * d loss/dx: scale the stored gradients in place,
        # so no second weight-sized tensor is ever made.
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in gradients]
        return (*scaled, None, None, None, None, None, None)


def _chunk_loss_and_grad(student_logits, teacher_logits, target_ids, settings, needs_grad):
    """Σ D·T² and Σ CE over one chunk (float32 scalars), and d((1-α)·ΣD·T² + α·ΣCE)/d logits.

    Closed forms instead of autograd, so a chunk keeps about 4 logits-sized float32 tensors alive
    instead of the ~9 of an autograd graph, in fewer passes. With a = student logits / T,
    q = softmax(a), p = softmax(teacher logits / T) and g = dD/d log q, the gradient through the
    log-softmax is dD/da = g − q·Σg, and dD·T²/d logits = T·dD/da:
        forward KL  D = Σ p (log p − log q)                             g = −p
        reverse KL  D = Σ q (log q − log p)                             g = q (log q − log p + 1)
        JSD(β)      D = β Σ p (log p − log m) + (1−β) Σ q (log q − log m),  m = β p + (1−β) q
                                                                        g = (1−β) q (log q − log m)
        CE (T = 1)  dCE/d logits = softmax(logits) − onehot(target)
    As in common.losses, a term whose probability is 0 counts 0, so -inf logits give no NaN.
    `student_logits` must be the chunk's own tensor: it is overwritten.
    """
    objective = settings["objective"]
    kind, temperature, beta, alpha = (objective.kind, objective.temperature, objective.beta,
                                      objective.alpha)
    if kind not in _CLOSED_FORM_KINDS:
        return _chunk_loss_and_grad_by_autograd(student_logits, teacher_logits, target_ids,
                                                settings, needs_grad)
    positions = torch.arange(target_ids.shape[0], device=target_ids.device)
    logits = student_logits.float()  # the same storage when already float32
    # Each row's largest logit is subtracted first, in place, so that everything below works on
    # values of the size of log-probabilities: a logsumexp of the logits themselves is rounded to
    # the logits' float32 spacing (2**-6 at 1e4 / T with T = 0.05), an error in every
    # log-probability, and a constant added to a row would change the result.
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = (log_normalizer.squeeze(-1) - logits[positions, target_ids]).sum()
    ce_grad = None
    if needs_grad and alpha > 0.0:
        ce_grad = (logits - log_normalizer).exp_()
        ce_grad[positions, target_ids] -= 1.0
    if temperature != 1.0:
        logits.div_(temperature)  # the row's largest stays 0
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    student_log_probs = logits.sub_(log_normalizer)
    teacher_logits = teacher_logits.float()
    if temperature != 1.0:  # shifted before the division, as the student's (log_softmax shifts too)
        teacher_logits = (teacher_logits - teacher_logits.amax(dim=-1, keepdim=True)).div_(
            temperature)
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    del teacher_logits

    if kind == "forward":
        teacher_probs = teacher_log_probs.exp()
        kd = _sum_of_p_log_ratio(teacher_probs, teacher_log_probs, student_log_probs)
        del teacher_log_probs
        if needs_grad:  # g = −p, so dD/da = q·Σp − p
            student_probs = student_log_probs.exp_()
            grad = student_probs.mul_(teacher_probs.sum(dim=-1, keepdim=True)).sub_(teacher_probs)
    else:
        student_probs = student_log_probs.exp()
        if kind == "reverse":
            log_ratio = student_log_probs - teacher_log_probs
        else:
            mixture_log_probs = torch.logaddexp(teacher_log_probs + math.log(beta),
                                                student_log_probs + math.log(1.0 - beta))
            kd_teacher = _sum_of_p_log_ratio(teacher_log_probs.exp(), teacher_log_probs,
                                             mixture_log_probs)
            log_ratio = student_log_probs.sub_(mixture_log_probs)
            del mixture_log_probs
        del teacher_log_probs
        terms = log_ratio.mul(student_probs)
        kd_student = terms.masked_fill_(student_probs == 0, 0.0).sum()  # 0·log 0 = 0
        del terms
        kd = kd_student if kind == "reverse" else beta * kd_teacher + (1.0 - beta) * kd_student
        if needs_grad:
            if kind == "reverse":
                g = log_ratio.add_(1.0).mul_(student_probs)
            else:
                g = log_ratio.mul_(student_probs).mul_(1.0 - beta)
            g.masked_fill_(student_probs == 0, 0.0)
            grad = g.sub_(student_probs * g.sum(dim=-1, keepdim=True))
    kd = kd * objective.scale
    if not needs_grad:
        return kd, ce, None
    if alpha == 1.0:
        return kd, ce, ce_grad
    grad.mul_((1.0 - alpha) * temperature)  # T² · (1/T): the scale, and a = logits / T
    if ce_grad is not None:
        grad.add_(ce_grad, alpha=alpha)
    return kd, ce, grad


def _chunk_loss_and_grad_by_autograd(student_logits, teacher_logits, target_ids, settings,
                                     needs_grad):
    """_chunk_loss_and_grad for the divergences without a closed form here (skew KL): the loss
    of common.losses on the chunk and its gradient by autograd. About twice the chunk's memory
    of the closed forms, still bounded by the chunk size."""
    objective = settings["objective"]
    with torch.enable_grad():  # autograd.Function.forward runs with grad mode off
        logits = student_logits.detach().float().requires_grad_(needs_grad)
        kd = objective.divergence(logits, teacher_logits).sum()
        ce = cross_entropy(logits, target_ids).sum()
        grad = None
        if needs_grad:
            (grad,) = torch.autograd.grad(objective.combine(kd, ce), logits)
    return kd.detach(), ce.detach(), grad


def _sum_of_p_log_ratio(probs, log_probs, other_log_probs):
    """Σ p (log p − log r) with 0·log 0 = 0, as common.losses computes KL terms."""
    terms = (log_probs - other_log_probs).mul_(probs)
    return terms.masked_fill_(probs == 0, 0.0).sum()
