"""The fused op's implementations. Each backend module offers the same two differentiable calls:

    attention_pool(h, scores, mask, direction, kind, eps) -> (context [B, H], attention [B, T])
    perturbation(scores, mask, direction, kind, eps) -> r [B, T]

and the pair calls (every backend: cpu, cuda, reference, triton) of the AT training step
(fused_attn_at/training.py; issue 17), with the same contract on every backend:

    attention_pool_pair(h, scores, mask, direction, kind, eps)
        -> (context_clean, attention_clean, context_adv, attention_adv)
       = attention_pool(h, scores, mask, None, 0, eps) + attention_pool(h, scores, mask, direction, kind, eps)
       (kind 1 or 2), in values and gradients; a kernel reads h once forward and once backward, writing
       grad_h once for both branches.
    attention_scores_grad(grad_context, grad_attention, h, attention) -> grad_scores [B, T]
       = the grad_scores of the op's backward (grad_attention may be None), a constant (no gradient); a kernel
       reads h once and writes nothing of size B*T*H (no grad_h).

kind (an int, see KIND): 0 no perturbation; 1 r = eps * direction / max(||direction||, 1e-12) over the valid
positions (AT with direction = grad, RP with direction = noise); 2 iAT built from the scores and
direction = grad (SPEC). mask is None or bool [B, T]; values at masked positions are never read.
Gradients flow to h and scores only; r is a constant.
"""
KIND = {None: 0, "at": 1, "rp": 1, "iat": 2}
# The backends that implement the pair calls (all of them now); a backend outside it would raise
# NotImplementedError naming itself, and fused_attn_at.adversarial_attention_loss would run two single ops there.
# (The compiled ops: csrc/cpu and csrc/cuda register attention_scores_grad, attention_pool_pair_fwd and
# attention_pool_pair_bwd, schemas in csrc/ops.cpp; a _C whose CUDA kernels lack them is named by
# cpp.PAIR_DEVICES.) tests/test_pair_op.py, tests/test_training_helper.py and tests/test_cuda_compile.py test them.
PAIR_BACKENDS = ("cpu", "cuda", "reference", "triton")
