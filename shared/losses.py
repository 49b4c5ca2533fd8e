"""The objectives several papers share word for word; each paper's own stay in its file.

    vqa_loss    VQA as multi-label classification, the head both UNITER [UNITER §4.1, §A.2
                "Visual Question Answering"] and Oscar [Oscar §4 "VQA"] put on the pooled [CLS].
                Official code: github.com/ChenRocks/UNITER (model/vqa.py, train_vqa.py) and
                github.com/microsoft/Oscar (oscar/modeling/modeling_bert.py
                `instance_bce_with_logits`, its loss_type 'bce' "[VQA]").
    scst_loss   self-critical sequence training [Rennie et al. 2017, "Self-critical Sequence
                Training for Image Captioning", CVPR], the CIDEr optimisation Oscar fine-tunes
                its captioner with [Oscar §5.1] (github.com/microsoft/Oscar,
                oscar/utils/caption_evaluate.py ScstRewardCriterion, greedy baseline).
"""

import torch.nn.functional as F
from torch import Tensor


def vqa_loss(logits: Tensor, scores: Tensor) -> Tensor:
    """One sigmoid per answer of the fixed vocabulary, against the answer's soft score (the
    share of annotators who gave it; on the world, 1 for the one right answer, 0 for the rest):

        L_VQA = (1/B) Σ_b Σ_a BCE(σ(z_ba), s_ba)

        symbol   variable          shape
        z        logits            (B, A)
        s        scores in [0, 1]  (B, A)

    Both official codes write it as the element-wise mean times A, which is the same number
    (UNITER's train_vqa.py: `loss.mean() * targets.size(1)`; Oscar's instance_bce_with_logits).
    """
    A = logits.shape[-1]
    bce = F.binary_cross_entropy_with_logits(logits.float(), scores.float().to(logits.device))
    return bce * A  # ()


def scst_loss(mean_logprob: Tensor, reward: Tensor, baseline: Tensor) -> Tensor:
    """REINFORCE with the greedy caption's reward as the baseline (self-critical):

        L_SCST = -(1/(B·n)) Σ_b Σ_i (r(w^bi) - r(ŵ^b)) · (1/|w^bi|) Σ_t log p(w^bi_t | w^bi_<t, I_b)

        symbol                 variable      shape
        (1/|w|) Σ_t log p      mean_logprob  (B, n)  n sampled captions an image, their mean
                                                      token log-prob (end token included)
        r(w)                   reward        (B, n)  CIDEr-D of each sample (no gradient)
        r(ŵ)                   baseline      (B,)    CIDEr-D of the image's greedy caption

    A sample better than the model's own greedy caption has its log-probability raised, a worse
    one lowered; the baseline needs no learned critic and makes the gradient's variance small.
    The mean token log-prob (not the sum) is what [code] weights: a long sample is not pushed
    harder than a short one for its length alone.
    """
    advantage = (reward - baseline[:, None]).detach().to(mean_logprob.dtype)  # (B, n)
    return -(advantage * mean_logprob).mean()  # ()
