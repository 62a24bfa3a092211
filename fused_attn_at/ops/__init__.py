"""The fused op's implementations. Each backend module offers the same two differentiable calls:

    attention_pool(h, scores, mask, direction, kind, eps) -> (context [B, H], attention [B, T])
    perturbation(scores, mask, direction, kind, eps) -> r [B, T]

kind (an int, see KIND): 0 no perturbation; 1 r = eps * direction / max(||direction||, 1e-12) over the valid
positions (AT with direction = grad, RP with direction = noise); 2 iAT built from the scores and
direction = grad (SPEC). mask is None or bool [B, T]; values at masked positions are never read.
Gradients flow to h and scores only; r is a constant.
"""
KIND = {None: 0, "at": 1, "rp": 1, "iat": 2}
