"""The one objective two papers share word for word: VQA as multi-label classification, the
head both UNITER [UNITER §4.1, §A.2 "Visual Question Answering"] and Oscar [Oscar §4 "VQA"]
put on the pooled [CLS]. Each paper's own objectives stay in its file. Official code:
github.com/ChenRocks/UNITER (model/vqa.py, train_vqa.py) and github.com/microsoft/Oscar
(oscar/modeling/modeling_bert.py `instance_bce_with_logits`, its loss_type 'bce' "[VQA]").
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
