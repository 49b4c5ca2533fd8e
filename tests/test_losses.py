r"""The loss math of all four papers: every objective, its equation, its oracles, its tests.

Each objective is a pure function in its paper file. It is tested against values worked out
by hand, a loop written straight from the equation, and an independent library where one
exists (POT for optimal transport; pycocoevalcap for BLEU / CIDEr-D in tests/test_metrics.py;
transformers for the BERT encoder in tests/test_bert.py). The tests below are named
test_<paper>_<what they prove>; shapes, masks, causality, equivalence and learning stay in the
per-paper test files.

Oscar (arXiv 2004.06165, ECCV version; oscar.py)
    | objective | equation (+ citation) | function | oracles | tests |
    |---|---|---|---|---|
    | Oscar masked token loss L_MTL | L_MTL = −E_{(v,h)~D} log p(h_i \| h_\i, v), h = [w, q], mean over masked tokens [Oscar §3, Eq. 2] | `oscar.masked_token_loss` | by hand (3 rows, one ignored; nothing masked -> 0); loop over the masked tokens from the equation; the corrupted inputs never a special id | `test_oscar_masked_token_loss_by_hand`, `test_oscar_masked_token_loss_is_eq_2_looped_over_the_masked_tokens`, `test_oscar.py::test_random_replacements_are_never_special_ids` |
    | Oscar contrastive loss L_C | L_C = −E_{(h',w)~D} log p(y \| f(h', w)), h' = [q, v], q polluted with p 0.5 [Oscar §3, Eq. 3] | `oscar.contrastive_loss` | by hand, both labellings; loop over the batch from the equation | `test_oscar_contrastive_loss_by_hand`, `test_oscar_contrastive_loss_is_eq_3_looped_over_the_batch` |
    | Oscar pre-training objective (composite) | L_Pre-training = L_MTL + L_C [Oscar §3, Eq. 4] | `oscar.pretraining_loss` (called by `Oscar.forward`) | by hand (the unweighted sum); the model's loss follows a replaced function | `test_oscar_pretraining_loss_is_eq_4_the_unweighted_sum`, `test_oscar.py::test_the_model_calls_the_composite_objective` |
    | Oscar retrieval fine-tuning | binary classification of aligned / unaligned pairs on [CLS], cross-entropy, one unaligned pair per aligned pair [Oscar §4; code] | `oscar.retrieval_loss` (pairs: `oscar.OscarDataset`) | loop over the batch from the equation; items 2k, 2k + 1 a positive and its negative | `test_oscar_retrieval_loss_is_binary_cross_entropy_looped_over_the_batch`, `test_oscar.py::test_retrieval_items_are_an_aligned_pair_then_its_unaligned_pair` |
    | Oscar captioning fine-tuning | L_MTL at the masked caption positions under the seq2seq mask [Oscar §4; App. A: 15 %, at most 3] | `oscar.masked_token_loss` with `caption_masked_count`, `caption_mask_positions`, `caption_attention_mask` | by hand (the count formula, round half to even); the mask block by block | `test_oscar.py::test_caption_masked_count_formula`, `test_oscar.py::test_caption_mask_positions_never_cls_and_the_final_sep_can_be_chosen`, `test_oscar.py::test_caption_attention_mask_four_blocks_and_padding` |
    | Oscar VQA | multi-label BCE against soft scores, summed over answers [Oscar §4] | `oscar.vqa_loss` (= `shared.losses.vqa_loss`) | by hand, element by element | `test_oscar_vqa_loss_is_bce_summed_over_answers` |

UNITER (arXiv 1909.11740v3; uniter.py)
    | objective | equation (+ citation) | function | oracles | tests |
    |---|---|---|---|---|
    | UNITER L_MLM | −(1/M) Σ_m log P_θ(w_m \| w_\m, v) [UNITER §3.2, Eq. 1] ([paper ≠ code]: the paper sums a pair's masked words; [code] and we average) | `uniter.mlm_loss` | by hand (log-softmax at the labels); logits at unlabelled positions changed | `test_uniter_mlm_loss_is_the_mean_over_labelled_positions_and_ignores_minus_100` |
    | UNITER L_ITM | −(1/B) Σ [y log s + (1 − y) log(1 − s)], s = softmax(z)₁ [UNITER §3.2, Eq. 2] | `uniter.itm_loss` | `F.binary_cross_entropy` on sigmoid(z₁ − z₀) | `test_uniter_itm_loss_is_binary_cross_entropy_on_the_match_probability` |
    | UNITER rank score | z₁ − z₀ (the argument of Eq. 2's sigmoid) or z₁ [UNITER §3.2, Eq. 2; code] | `uniter.rank_score` | by hand; log(p / (1 − p)) | `test_uniter_rank_score_is_the_log_odds_of_match_or_the_match_logit` |
    | UNITER IPOT plan | proximal point steps, K = 1 [UNITER §A.7, Eq. 6, Alg. 1] | `shared.ot.ipot` (= `uniter.ipot`) | marginals; per-example loop; POT `ot.emd2` (exact EMD) | `test_uniter_ipot_marginals_*`, `test_uniter_ipot_gives_an_all_zero_plan_*`, `test_uniter_ipot_with_many_iterations_matches_pot_exact_emd`, `test_uniter_batched_ipot_equals_a_loop_*`, `test_uniter_ipot_keeps_the_dtype_*` |
    | UNITER OT distance d_b | Σ_ij C_ij T_ij, C = 1 − cos [UNITER §3.2, Eq. 3] | `uniter.wra_distance` | by hand per example (cosine cost × IPOT plan) | `test_uniter_wra_distance_is_sum_of_cosine_cost_times_plan_and_lies_in_0_2` |
    | UNITER L_WRA | (Σ_pos d − Σ_neg d) / B [UNITER §3.2, Eq. 3; code] ([paper ≠ code]: Eq. 3 minimises d of a pair, no negatives) | `uniter.wra_loss` | by hand from d; the gradient against a loss with a precomputed constant plan; fp32 under bf16 autocast | `test_uniter_wra_loss_sign_convention_*`, `test_uniter_wra_gradient_reaches_the_hidden_states_only_through_the_cost`, `test_uniter_wra_runs_in_fp32_*` |
    | UNITER ITM batch (composite) | L_ITM + λ L_WRA, λ = 0.1 [code] | `uniter.itm_wra_loss` (called by `UNITER.forward_itm`) | by hand | `test_uniter_itm_wra_loss_is_itm_plus_the_weighted_wra_and_itm_alone_without_wra`; model: `test_uniter.py::test_every_task_loss_is_unchanged_by_extra_padding[itm]`, `test_uniter.py::test_a_tiny_model_overfits_one_batch_of_each_task[itm]` |
    | UNITER L_MRFR | (1/(M·F)) Σ_i ‖h_θ(v_i) − r(v_i)‖² [UNITER §3.2, Eq. 4] ([paper ≠ code]: the paper sums) | `uniter.mrfr_loss` | loop over the masked regions; unmasked rows changed | `test_uniter_mrfr_loss_is_the_mse_over_masked_regions_only`; tied head: `test_uniter.py::test_the_mlm_and_mrfr_output_layers_are_the_embedding_weights_themselves[mrfr]` |
    | UNITER L_MRC | −(1/M) Σ_i log softmax(g_θ(v_i))[1 + argmax_{c≥1} p̃_c] [UNITER §3.2, Eq. 4] ([paper ≠ code]: the paper sums) | `uniter.mrc_loss` | by hand (background never a target) | `test_uniter_mrc_loss_targets_the_best_object_class_never_background_and_only_masked_regions` |
    | UNITER L_MRC-kl | (1/M) Σ_i KL(p̃(v_i) ‖ softmax g_θ(v_i)) [UNITER §3.2, Eq. 4] ("region"); [code]'s kl_div(...).mean() = that / C ("element", `Config.mrc_kl_scale`) [paper ≠ code] | `uniter.mrc_kl_loss` | loop Σ t (log t − log p) with 0 log 0 = 0; KL(t ‖ t) = 0; `F.kl_div(..., reduction="none").mean()` as [code] | `test_uniter_mrc_kl_loss_equals_a_hand_written_sum_of_t_log_t_over_p`, `test_uniter_mrc_kl_loss_element_scale_is_the_codes_kl_div_mean_the_region_kl_over_c`; model: `test_uniter.py::test_mrc_kl_scale_element_divides_the_models_mrc_kl_loss_by_the_classes` |
    | UNITER L_rank | mean max(0, m + σ(s⁻) − σ(s⁺)) [UNITER §4.1; code] | `uniter.rank_hinge_loss` (hard negatives: `UNITER.forward_rank`) | loop over the hinge terms; the rank forward against scores computed one image at a time | `test_uniter_rank_hinge_loss_equals_a_loop_over_the_equation`, `test_uniter.py::test_forward_rank_trains_on_the_hardest_negatives_of_the_batch` |
    | UNITER L_VQA | (1/B) Σ_b Σ_a BCE(σ(z_ba), s_ba) [UNITER §A.2] | `shared.losses.vqa_loss` (= `uniter.vqa_loss`) | loop over per-answer BCE | `test_uniter_vqa_loss_is_the_per_answer_binary_cross_entropy_summed_then_averaged_over_the_batch` |

VirTex (arXiv 2006.06666; virtex.py; cited by part name)
    | objective | equation (+ citation) | function | oracles | tests |
    |---|---|---|---|---|
    | forward / backward captioning L_f, L_b | L_f = −Σ_t log p(c_t \| c_<t, I; θ, φ_f) (L_b: c_>t, φ_b, reversed tokens); mean over non-pad targets [VirTex §Method: bicaptioning; code] | `virtex.captioning_loss` | by hand (2-token caption, p = 3/6); loop over b, t from the equation; pad positions perturbed, loss unchanged | `test_virtex_captioning_loss_by_hand_on_a_two_token_caption`, `test_virtex_captioning_loss_ignores_pads_and_equals_the_loop_version` |
    | bicaptioning (composite) | L = L_f + L_b, no weights [VirTex §Method: bicaptioning; code] | `virtex.bicaptioning_loss` (called by `VirTex.forward`) | by hand (−log 0.5 − log 0.7); unit gradients to both terms; the model's loss is the composite's (monkeypatched) | `test_virtex_captioning_loss_by_hand_on_a_two_token_caption`, `test_virtex_bicaptioning_loss_is_the_unweighted_sum_of_both_directions`; `test_virtex.py::test_the_model_returns_the_bicaptioning_composite`, `test_virtex.py::test_every_pretext_runs_forward_and_backward` |
    | token classification | L = (1/B') Σ_b −(1/K_b) Σ_{v∈S_b} log softmax(z_b)_v [VirTex §Ablations: pretraining tasks; code] | `virtex.token_classification_loss` | by hand (−(log 0.2 + log 0.4)/2); loop over rows; empty label sets (kdexd/virtex #28) | `test_virtex_token_classification_loss_by_hand_loop_and_empty_label_sets` |
    | masked LM | L = −(1/\|M\|) Σ_{t∈M} log softmax(logits_t)_{c_t}, decoder without the causal mask [VirTex §Ablations: pretraining tasks] | `virtex.masked_lm_loss` (inputs: `virtex.mask_tokens`) | by hand (two labelled positions) | `test_virtex_masked_lm_loss_counts_only_labelled_positions`; `test_virtex.py::test_mask_tokens_masks_15_percent_of_ordinary_tokens_and_labels_them` |

CoCa (arXiv 2205.01917v2; coca.py)
    | objective | equation (+ citation) | function | oracles | tests |
    |---|---|---|---|---|
    | CoCa contrastive L_Con | −(1/N)(Σ_i log exp(x_iᵀy_i/σ)/Σ_j exp(x_iᵀy_j/σ) + Σ_i log exp(y_iᵀx_i/σ)/Σ_j exp(y_iᵀx_j/σ)) [CoCa §3.1, Eq. 2] | `coca.contrastive_loss` | by hand (orthonormal pairs, σ = 1: 2·−log(e/(e+1))); loop written from Eq. 2 (float64, rel 1e-10); limits (0 for matched pairs at 1/σ = 100, 2·log B for random ones) | `test_coca_contrastive_loss_by_hand_on_orthonormal_pairs`, `test_coca_contrastive_loss_is_zero_for_matched_pairs_and_2_log_B_for_random_ones`, `test_coca_contrastive_loss_equals_the_loop_written_from_eq2` |
    | CoCa captioning L_Cap | −Σ_t log P_θ(y_t \| y_<t, x) [CoCa §3.1, Eq. 3] (DEVIATION: mean over non-pad targets) | `coca.captioning_loss` | loop over non-pad targets by hand; perturbing pad-target predictions changes nothing | `test_coca_captioning_loss_shifts_inside_and_ignores_pads` |
    | CoCa composite L_CoCa | λ_Con·L_Con + λ_Cap·L_Cap [CoCa §3.2, Eq. 4], λ_Con = 1, λ_Cap = 2 [CoCa §4.1] | `coca.coca_loss` (called by `CoCa.forward`) | by hand (0.5 + 2·3 = 6.5); forward's loss = L_Con + 2·L_Cap and the Table 8b ablations (test_coca.py) | `test_coca_loss_weights_the_two_terms`, `test_coca.py::test_forward_returns_the_loss_dict_and_the_ablations_drop_a_term` |

"""

import math

import pytest
import torch
import torch.nn.functional as F

import coca
import oscar
import uniter
import virtex


# --- Oscar -----------------------------------------------------------------------------------

IGNORE = oscar.IGNORE


def test_oscar_masked_token_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, 3.0, 0.0]])
    labels = torch.tensor([0, IGNORE, 1])
    # -log softmax at the labels of rows 0 and 2, averaged over the 2 labelled rows
    row0 = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    row2 = -(3.0 - math.log(math.e + math.exp(3) + 1))
    assert oscar.masked_token_loss(logits, labels).item() == pytest.approx((row0 + row2) / 2,
                                                                           rel=1e-6)
    assert oscar.masked_token_loss(logits, torch.full((3,), IGNORE)).item() == 0.0


def test_oscar_masked_token_loss_is_eq_2_looped_over_the_masked_tokens():
    """L_MTL = -E log p(h_i | h_\\i, v): the mean over masked tokens of -log softmax(z)[h_i]."""
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 7), torch.randint(0, 7, (12,))
    labels[::3] = IGNORE  # not masked: no term
    terms = [-(logits[m, labels[m]] - torch.logsumexp(logits[m], 0)) for m in range(12)
             if labels[m] != IGNORE]
    expected = sum(terms) / len(terms)
    assert oscar.masked_token_loss(logits, labels).item() == pytest.approx(expected.item(),
                                                                           rel=1e-6)


def test_oscar_contrastive_loss_by_hand():
    logits = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    polluted = torch.tensor([False, True])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2
    assert oscar.contrastive_loss(logits, polluted).item() == pytest.approx(expected, rel=1e-6)
    flipped = oscar.contrastive_loss(logits, ~polluted).item()
    assert flipped == pytest.approx((math.log(1 + math.exp(2)) * 2) / 2, rel=1e-6)


def test_oscar_contrastive_loss_is_eq_3_looped_over_the_batch():
    """L_C = -E log p(y | f(h', w)), p a softmax over (not polluted, polluted)."""
    torch.manual_seed(1)
    logits, polluted = torch.randn(9, 2), torch.rand(9) < 0.5
    expected = -sum(torch.log_softmax(logits[b], 0)[int(polluted[b])] for b in range(9)) / 9
    assert oscar.contrastive_loss(logits, polluted).item() == pytest.approx(expected.item(),
                                                                            rel=1e-6)


def test_oscar_pretraining_loss_is_eq_4_the_unweighted_sum():
    mtl, contrastive = torch.tensor(1.25), torch.tensor(0.5)
    assert oscar.pretraining_loss(mtl, contrastive).item() == 1.75
    assert oscar.pretraining_loss(contrastive, mtl).item() == 1.75  # no weights to swap


def test_oscar_retrieval_loss_is_binary_cross_entropy_looped_over_the_batch():
    torch.manual_seed(2)
    logits, is_match = torch.randn(6, 2), torch.tensor([True, False, True, True, False, False])
    expected = -sum(torch.log_softmax(logits[b], 0)[int(is_match[b])] for b in range(6)) / 6
    assert oscar.retrieval_loss(logits, is_match).item() == pytest.approx(expected.item(),
                                                                          rel=1e-6)


def test_oscar_vqa_loss_is_bce_summed_over_answers():
    logits, scores = torch.randn(4, 7), torch.rand(4, 7)
    by_hand = sum(-(s * math.log(torch.sigmoid(x)) + (1 - s) * math.log(1 - torch.sigmoid(x)))
                  for row_x, row_s in zip(logits, scores) for x, s in zip(row_x, row_s)) / 4
    assert oscar.vqa_loss(logits, scores).item() == pytest.approx(float(by_hand), rel=1e-5)


# --- UNITER ----------------------------------------------------------------------------------

def ragged_masks(lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) bool, the first lengths[b] entries of row b real."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def random_problem(seed: int, lengths_x=(5, 3, 8, 1), lengths_y=(7, 4, 2, 6), T=8, N=7,
                   dtype=torch.float64):
    """Costs in [0, 2] like 1 - cos, garbage (inf, nan, huge) on every padded pair."""
    g = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(len(lengths_x), T, N, generator=g, dtype=dtype)
    x_mask, y_mask = ragged_masks(list(lengths_x), T), ragged_masks(list(lengths_y), N)
    padded = ~(x_mask[:, :, None] & y_mask[:, None, :])
    garbage = torch.tensor([math.inf, math.nan, -1e6], dtype=dtype)
    cost[padded] = garbage[torch.arange(int(padded.sum())) % 3]
    return cost, x_mask, y_mask


# --- MLM, MRFR, MRC, MRC-kl, ITM ---------------------------------------------------------------

def test_uniter_mlm_loss_is_the_mean_over_labelled_positions_and_ignores_minus_100():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 7, 2, 10
    expected = -(logits[0, 1].log_softmax(-1)[7] + logits[0, 3].log_softmax(-1)[2]
                 + logits[1, 4].log_softmax(-1)[10]) / 3
    assert uniter.mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[labels == -100] = 50 * torch.randn(int((labels == -100).sum()), 11)
    assert uniter.mlm_loss(changed, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert uniter.mlm_loss(logits, torch.full((2, 5), -100)).item() == 0.0  # nothing masked


def test_uniter_mrfr_loss_is_the_mse_over_masked_regions_only():
    torch.manual_seed(0)
    predicted, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    masked = torch.tensor([[True, False, False, True], [False, False, True, False]])
    expected = sum(((predicted[b, n] - target[b, n]) ** 2).mean()
                   for b, n in masked.nonzero().tolist()) / 3
    assert uniter.mrfr_loss(predicted, target, masked).item() == pytest.approx(expected.item())
    predicted[~masked] = 1e3  # unmasked rows do not count
    assert uniter.mrfr_loss(predicted, target, masked).item() == pytest.approx(expected.item())
    assert uniter.mrfr_loss(predicted, target, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_uniter_mrc_loss_targets_the_best_object_class_never_background_and_only_masked_regions():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4)
    detector_probs = torch.tensor([[[0.7, 0.1, 0.15, 0.05],  # background most likely -> class 2
                                    [0.1, 0.6, 0.2, 0.1],  # -> class 1
                                    [0.0, 0.1, 0.1, 0.8]]])  # unmasked
    masked = torch.tensor([[True, True, False]])
    expected = -(logits[0, 0].log_softmax(-1)[2] + logits[0, 1].log_softmax(-1)[1]) / 2
    assert uniter.mrc_loss(logits, detector_probs, masked).item() == pytest.approx(expected.item())
    logits[0, 2] = 100 * torch.randn(4)  # an unmasked region changes nothing
    assert uniter.mrc_loss(logits, detector_probs, masked).item() == pytest.approx(expected.item())


def test_uniter_mrc_kl_loss_equals_a_hand_written_sum_of_t_log_t_over_p():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    t = torch.softmax(3 * torch.randn(2, 3, 5, dtype=torch.float64), dim=-1)
    t[0, 0] = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], dtype=torch.float64)  # zeros: 0 log 0 = 0
    masked = torch.tensor([[True, False, True], [False, True, True]])
    total, count = 0.0, 0
    for b in range(2):
        for n in range(3):
            if not masked[b, n]:
                continue
            log_p = torch.log_softmax(logits[b, n], dim=-1).tolist()
            total += sum(tc * (math.log(tc) - lp) for tc, lp in zip(t[b, n].tolist(), log_p)
                         if tc > 0)
            count += 1
    assert uniter.mrc_kl_loss(logits, t, masked).item() == pytest.approx(total / count, rel=1e-6)
    # KL(t || t) = 0 when the model reproduces the detector (background included)
    assert uniter.mrc_kl_loss(t.clamp(min=1e-30).log(), t, masked).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_uniter_mrc_kl_loss_element_scale_is_the_codes_kl_div_mean_the_region_kl_over_c():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    t = torch.softmax(3 * torch.randn(2, 3, 5, dtype=torch.float64), dim=-1)
    masked = torch.tensor([[True, False, True], [False, True, True]])
    code = F.kl_div(logits[masked].log_softmax(-1), t[masked], reduction="none").mean()
    element = uniter.mrc_kl_loss(logits, t, masked, scale="element")
    assert element.item() == pytest.approx(code.item(), rel=1e-6)  # [code] model/pretrain.py
    region = uniter.mrc_kl_loss(logits, t, masked, scale="region")
    assert region.item() == pytest.approx(5 * element.item(), rel=1e-6)  # C = 5 classes
    assert region.item() == pytest.approx(uniter.mrc_kl_loss(logits, t, masked).item())


def test_uniter_itm_loss_is_binary_cross_entropy_on_the_match_probability():
    torch.manual_seed(0)
    logits = torch.randn(6, 2)
    is_match = torch.tensor([True, False, True, True, False, False])
    match_prob = torch.sigmoid(logits[:, 1] - logits[:, 0])  # softmax(z)_1
    expected = F.binary_cross_entropy(match_prob, is_match.float())
    assert uniter.itm_loss(logits, is_match).item() == pytest.approx(expected.item(), rel=1e-5)
    assert uniter.itm_loss(logits, is_match.long()).item() == pytest.approx(expected.item(),
                                                                             rel=1e-5)


# --- IPOT --------------------------------------------------------------------------------------

def test_uniter_ipot_marginals_are_uniform_over_real_entries_and_padding_is_exact_zero():
    cost, x_mask, y_mask = random_problem(0)
    plan = uniter.ipot(cost, x_mask, y_mask)  # 50 iterations, β = 0.5, k = 1
    n_x = x_mask.sum(1, keepdim=True).double()  # (B, 1)
    n_y = y_mask.sum(1, keepdim=True).double()  # (B, 1)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert (plan[~(x_mask[:, :, None] & y_mask[:, None, :])] == 0).all()  # exact zeros
    rows, cols = plan.sum(2), plan.sum(1)  # (B, T), (B, N)
    assert torch.allclose(rows[x_mask], (1.0 / n_x).expand_as(rows)[x_mask], atol=1e-12)  # exact
    assert torch.allclose(cols[y_mask], (1.0 / n_y).expand_as(cols)[y_mask], rtol=1e-2)  # close
    assert torch.allclose(plan.sum((1, 2)), torch.ones(4, dtype=torch.float64), atol=1e-12)
    longer = uniter.ipot(cost, x_mask, y_mask, iters=1000)  # the region side converges too
    assert torch.allclose(longer.sum(1)[y_mask], (1.0 / n_y).expand_as(cols)[y_mask], atol=1e-9)


def test_uniter_ipot_gives_an_all_zero_plan_to_an_example_without_regions():
    cost, x_mask, y_mask = random_problem(1)
    y_mask[2] = False
    plan = uniter.ipot(cost, x_mask, y_mask)
    assert (plan[2] == 0).all() and torch.isfinite(plan).all()
    assert torch.allclose(plan.sum((1, 2))[[0, 1, 3]], torch.ones(3, dtype=torch.float64))


def test_uniter_ipot_with_many_iterations_matches_pot_exact_emd():
    ot = pytest.importorskip("ot")
    lengths_x, lengths_y = (5, 3, 12, 2, 9, 7), (7, 4, 2, 11, 9, 1)
    cost, x_mask, y_mask = random_problem(2, lengths_x, lengths_y, T=12, N=11)
    plan = uniter.ipot(cost, x_mask, y_mask, iters=2000)
    for b, (nx, ny) in enumerate(zip(lengths_x, lengths_y)):
        c = cost[b, :nx, :ny]
        exact = ot.emd2(torch.full((nx,), 1.0 / nx, dtype=torch.float64).numpy(),
                        torch.full((ny,), 1.0 / ny, dtype=torch.float64).numpy(), c.numpy())
        ours = (c * plan[b, :nx, :ny]).sum().item()
        assert ours == pytest.approx(exact, abs=1e-4), (b, ours, exact)


def test_uniter_batched_ipot_equals_a_loop_over_examples_cut_to_their_real_sizes():
    cost, x_mask, y_mask = random_problem(3)
    plan = uniter.ipot(cost, x_mask, y_mask, beta=0.5, iters=50, k=2)
    for b in range(cost.shape[0]):
        nx, ny = int(x_mask[b].sum()), int(y_mask[b].sum())
        one = uniter.ipot(cost[b:b + 1, :nx, :ny], x_mask[b:b + 1, :nx], y_mask[b:b + 1, :ny],
                          beta=0.5, iters=50, k=2)
        assert torch.allclose(plan[b, :nx, :ny], one[0], atol=1e-14)


def test_uniter_ipot_keeps_the_dtype_computes_no_gradient_and_rejects_bad_input():
    cost, x_mask, y_mask = random_problem(4)
    cost = cost.masked_fill(~(x_mask[:, :, None] & y_mask[:, None, :]), 0.0)
    plans = {}
    for dtype in (torch.float32, torch.float64):
        leaf = cost.to(dtype).requires_grad_()
        plans[dtype] = uniter.ipot(leaf, x_mask, y_mask)
        assert plans[dtype].dtype == dtype
        assert not plans[dtype].requires_grad and plans[dtype].grad_fn is None
    assert torch.allclose(plans[torch.float32].double(), plans[torch.float64], atol=1e-6)
    with pytest.raises(ValueError, match="fp32 or fp64"):
        uniter.ipot(cost.bfloat16(), x_mask, y_mask)
    with pytest.raises(ValueError, match=r"cost must be \(B, T, N\)"):
        uniter.ipot(cost[0], x_mask, y_mask)
    with pytest.raises(ValueError, match="y_mask"):
        uniter.ipot(cost, x_mask, y_mask[:, :-1])
    with pytest.raises(ValueError, match="must be bool"):
        uniter.ipot(cost, x_mask.long(), y_mask)
    with pytest.raises(ValueError, match="beta > 0"):
        uniter.ipot(cost, x_mask, y_mask, beta=0.0)


# --- WRA ---------------------------------------------------------------------------------------

def wra_inputs(seed: int = 0, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    text_mask, region_mask = ragged_masks([6, 3, 8, 5], 8), ragged_masks([7, 5, 2, 7], 7)
    text_hidden = torch.randn(4, 8, D, generator=g, dtype=torch.float64)
    region_hidden = torch.randn(4, 7, D, generator=g, dtype=torch.float64)
    region_hidden[0] = text_hidden[0, :7] + 0.1 * torch.randn(7, D, generator=g,
                                                             dtype=torch.float64)  # aligned
    return text_hidden, region_hidden, text_mask, region_mask


def test_uniter_wra_distance_is_sum_of_cosine_cost_times_plan_and_lies_in_0_2():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    d = uniter.wra_distance(text_hidden, region_hidden, text_mask, region_mask)
    assert d.shape == (4,) and d.dtype == torch.float32
    assert ((d >= 0) & (d <= 2)).all()
    assert d[0] < d[1:].min()  # the aligned pair is the closest
    for b in range(4):  # by hand: cosine cost on the real part, plan of that cost
        nx, ny = int(text_mask[b].sum()), int(region_mask[b].sum())
        x = text_hidden[b, :nx].float()
        y = region_hidden[b, :ny].float()
        cost = 1 - (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])
        plan = uniter.ipot(cost[None], text_mask[b:b + 1, :nx], region_mask[b:b + 1, :ny])[0]
        assert d[b].item() == pytest.approx((cost * plan).sum().item(), abs=1e-5)


def test_uniter_wra_loss_sign_convention_positives_minus_negatives_over_batch_size():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    d = uniter.wra_distance(text_hidden, region_hidden, text_mask, region_mask)
    is_match = torch.tensor([True, False, True, False])
    loss = uniter.wra_loss(text_hidden, region_hidden, text_mask, region_mask, is_match)
    assert loss.item() == pytest.approx(((d[0] + d[2]) - (d[1] + d[3])).item() / 4, abs=1e-6)
    all_match = uniter.wra_loss(text_hidden, region_hidden, text_mask, region_mask,
                                torch.ones(4, dtype=torch.long))
    assert all_match.item() == pytest.approx(d.mean().item(), abs=1e-6)


def test_uniter_wra_gradient_reaches_the_hidden_states_only_through_the_cost():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    is_match = torch.tensor([True, False, True, False])
    x = text_hidden.float().requires_grad_()
    y = region_hidden.float().requires_grad_()
    uniter.wra_loss(x, y, text_mask, region_mask, is_match).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad[text_mask].abs().sum(-1).min() > 0  # every real token gets a gradient
    assert y.grad[region_mask].abs().sum(-1).min() > 0  # every real region gets a gradient
    assert (x.grad[~text_mask] == 0).all() and (y.grad[~region_mask] == 0).all()

    # the same gradient as a loss in which the plan is a constant computed beforehand
    x2, y2 = text_hidden.float().requires_grad_(), region_hidden.float().requires_grad_()
    cost = 1 - F.normalize(x2, dim=-1, eps=1e-5) @ F.normalize(y2, dim=-1, eps=1e-5).transpose(1, 2)
    cost = cost.masked_fill(~(text_mask[:, :, None] & region_mask[:, None, :]), 0.0)
    plan = uniter.ipot(cost.detach(), text_mask, region_mask)
    sign = is_match.float() * 2 - 1
    ((sign[:, None, None] * cost * plan).sum() / 4).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-7) and torch.allclose(y.grad, y2.grad,
                                                                           atol=1e-7)


def test_uniter_wra_runs_in_fp32_for_bf16_hidden_states_and_under_autocast():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    is_match = torch.ones(4, dtype=torch.bool)
    x, y = text_hidden.bfloat16(), region_hidden.bfloat16()
    loss = uniter.wra_loss(x, y, text_mask, region_mask, is_match)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py trains under autocast
        autocast_loss = uniter.wra_loss(x, y, text_mask, region_mask, is_match)
    assert autocast_loss.dtype == torch.float32 and autocast_loss.item() == loss.item()


# --- the composite of an ITM batch, retrieval and VQA ---------------------------------------------

def test_uniter_itm_wra_loss_is_itm_plus_the_weighted_wra_and_itm_alone_without_wra():
    itm, wra = torch.tensor(0.7), torch.tensor(-0.3)
    assert uniter.itm_wra_loss(itm, wra, 0.1).item() == pytest.approx(0.7 - 0.03)
    assert uniter.itm_wra_loss(itm, None, 0.1) is itm


def test_uniter_rank_score_is_the_log_odds_of_match_or_the_match_logit():
    logits = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    assert uniter.rank_score(logits).tolist() == [1.5, -2.0]
    p = logits.softmax(-1)[:, 1]
    assert torch.allclose(uniter.rank_score(logits), torch.log(p / (1 - p)))
    assert uniter.rank_score(logits, "match_logit").tolist() == [2.0, -1.0]


def test_uniter_rank_hinge_loss_equals_a_loop_over_the_equation():
    g = torch.Generator().manual_seed(0)
    positive, negative = 2 * torch.randn(5, generator=g), 2 * torch.randn(5, 3, generator=g)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [max(0.0, 0.3 + sigmoid(negative[b, k].item()) - sigmoid(positive[b].item()))
             for b in range(5) for k in range(3)]
    assert 0 < sum(t == 0 for t in terms) < len(terms)  # the hinge is both active and not
    loss = uniter.rank_hinge_loss(positive, negative, margin=0.3)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_uniter_vqa_loss_is_the_per_answer_binary_cross_entropy_summed_then_averaged_over_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    scores = torch.rand(4, 6, generator=g, dtype=torch.float64)  # soft scores in [0, 1]
    scores[0] = torch.tensor([0, 1, 0, 0, 0, 0])  # one right answer
    total = 0.0
    for b in range(4):
        for a in range(6):
            z, s = logits[b, a].item(), scores[b, a].item()
            p = 1 / (1 + math.exp(-z))
            total -= s * math.log(p) + (1 - s) * math.log(1 - p)
    assert uniter.vqa_loss(logits, scores).item() == pytest.approx(total / 4, rel=1e-5)


# --- VirTex ----------------------------------------------------------------------------------

SOS, EOS = 2, 3  # shared.tokenizer's [CLS], [SEP]; [PAD] = 0


def test_virtex_captioning_loss_by_hand_on_a_two_token_caption():
    """[SOS] a: one target; logits at position 0 are (0, log 3, 0, 0) -> p(a = 1) = 3/6."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1] = math.log(3.0)
    logits[0, 1] = torch.randn(4)  # position 1 predicts nothing: no target after it
    tokens = torch.tensor([[2, 1]])
    assert virtex.captioning_loss(logits, tokens).item() == pytest.approx(-math.log(0.5),
                                                                          abs=1e-6)
    # bicaptioning: backward tokens [a, SOS] = [1, 2]; p(SOS | a) from backward logits at 0
    backward_logits = torch.zeros(1, 2, 4)
    backward_logits[0, 0, 2] = math.log(7.0)  # p = 7/10
    loss = virtex.bicaptioning_loss(
        virtex.captioning_loss(logits, tokens),
        virtex.captioning_loss(backward_logits, virtex.reverse_captions(tokens)))
    assert loss.item() == pytest.approx(-math.log(0.5) - math.log(0.7), abs=1e-6)


def test_virtex_bicaptioning_loss_is_the_unweighted_sum_of_both_directions():
    forward = torch.tensor(1.25, requires_grad=True)
    backward = torch.tensor(0.5, requires_grad=True)
    loss = virtex.bicaptioning_loss(forward, backward)
    loss.backward()
    assert loss.item() == pytest.approx(1.75)  # no 1/2 factor, as the official code
    assert forward.grad.item() == backward.grad.item() == 1.0


def test_virtex_captioning_loss_ignores_pads_and_equals_the_loop_version():
    torch.manual_seed(0)
    tokens = torch.tensor([[SOS, 7, 8, EOS, 0, 0], [SOS, 9, EOS, 0, 0, 0]])
    logits = torch.randn(2, 6, 12)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, 6):
            if tokens[b, t] != 0:
                total -= logits[b, t - 1].log_softmax(-1)[tokens[b, t]].item()
                count += 1
    assert virtex.captioning_loss(logits, tokens).item() == pytest.approx(total / count, abs=1e-5)
    changed = logits.clone()
    changed[0, 3:] += 5 * torch.randn(3, 12)  # positions whose targets are pads
    changed[1, 2:] += 5 * torch.randn(4, 12)
    assert torch.allclose(virtex.captioning_loss(changed, tokens),
                          virtex.captioning_loss(logits, tokens))


def test_virtex_token_classification_loss_by_hand_loop_and_empty_label_sets():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
    targets = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]])  # row 1: an empty label set
    # row 0: -(log 2/10 + log 4/10) / 2; row 1 left out of the mean
    expected = -(math.log(0.2) + math.log(0.4)) / 2
    loss = virtex.token_classification_loss(logits, targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, abs=1e-6)
    empty = virtex.token_classification_loss(logits, torch.zeros_like(targets, dtype=torch.float))
    assert empty.item() == 0.0  # kdexd/virtex #28 gave NaN here
    # loop version over random rows
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 9), (torch.rand(5, 9) < 0.3).float()
    targets[2] = 0
    rows = []
    for b in range(5):
        labels = targets[b].nonzero().flatten().tolist()
        if labels:
            rows.append(-sum(logits[b].log_softmax(-1)[v].item() for v in labels) / len(labels))
    assert virtex.token_classification_loss(logits, targets).item() == pytest.approx(
        sum(rows) / len(rows), abs=1e-5)


def test_virtex_masked_lm_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[0, 5, 0, 2]])
    expected = -(logits[0, 1].log_softmax(-1)[5] + logits[0, 3].log_softmax(-1)[2]) / 2
    assert virtex.masked_lm_loss(logits, labels).item() == pytest.approx(expected.item(),
                                                                         abs=1e-6)


# --- CoCa ------------------------------------------------------------------------------------

def coca_contrastive_loss_loop(x, y, sigma):
    """[CoCa Eq. 2] term by term:
    -(1/N)(Σ_i log softmax_j(x_i·y_j/σ)[i] + Σ_i log softmax_j(y_i·x_j/σ)[i])."""
    N = len(x)
    total = 0.0
    for i in range(N):
        total += math.log(math.exp(x[i] @ y[i] / sigma)
                          / sum(math.exp(x[i] @ y[j] / sigma) for j in range(N)))
        total += math.log(math.exp(y[i] @ x[i] / sigma)
                          / sum(math.exp(y[i] @ x[j] / sigma) for j in range(N)))
    return -total / N


def test_coca_contrastive_loss_by_hand_on_orthonormal_pairs():
    """[CoCa Eq. 2] x_i = y_i = e_i, σ = 1: each of the 2·N terms is -log(e / (e + 1)), and 1/N
    leaves the two directions summed: L = 2 · -log(e / (e + 1))."""
    x = torch.eye(2)
    expected = 2 * -math.log(math.e / (math.e + 1))
    assert coca.contrastive_loss(x, x.clone(), torch.tensor(0.0)).item() == pytest.approx(expected)


def test_coca_contrastive_loss_is_zero_for_matched_pairs_and_2_log_B_for_random_ones():
    matched = torch.eye(8)  # orthonormal, x_i = y_i
    high = torch.tensor(math.log(100.0))  # 1/σ = 100
    assert coca.contrastive_loss(matched, matched, high).item() < 1e-6
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4096, generator=gen), torch.randn(8, 4096, generator=gen)
    # random unit vectors in 4096-d are nearly orthogonal: every softmax is ≈ uniform over B
    assert coca.contrastive_loss(x, y, torch.tensor(0.0)).item() == pytest.approx(2 * math.log(8),
                                                                                   abs=0.05)


def test_coca_contrastive_loss_equals_the_loop_written_from_eq2():
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    sigma = 0.3
    got = coca.contrastive_loss(x, y, torch.tensor(math.log(1 / sigma), dtype=torch.float64))
    assert got.item() == pytest.approx(coca_contrastive_loss_loop(x, y, sigma), rel=1e-10)
    # and it normalises its inputs itself (CoCa-pytorch issue #10): scaling x changes nothing
    assert torch.allclose(coca.contrastive_loss(3 * x, y, torch.tensor(math.log(1 / sigma),
                                                                       dtype=torch.float64)), got)


def test_coca_captioning_loss_shifts_inside_and_ignores_pads():
    """[CoCa Eq. 3] logits[:, t] predicts tokens[:, t+1]; the mean runs over non-pad targets."""
    cls, sep = 2, 3  # shared.tokenizer's [CLS] and [SEP]; any non-zero ids would do
    gen = torch.Generator().manual_seed(2)
    tokens = torch.tensor([[cls, 7, 8, sep, 0, 0], [cls, 9, sep, 0, 0, 0]])  # (2, 6)
    logits = torch.randn(2, 6, 12, generator=gen)  # (B, T, V)
    by_hand = []
    for b in range(2):
        for t in range(5):
            if tokens[b, t + 1] != 0:
                by_hand.append(-logits[b, t].log_softmax(-1)[tokens[b, t + 1]])
    expected = torch.stack(by_hand).mean()  # 3 + 2 targets
    assert torch.allclose(coca.captioning_loss(logits, tokens), expected)
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(3, 12, generator=gen)  # predictions of pad targets only
    changed[1, 2:] = 100 * torch.randn(4, 12, generator=gen)
    assert torch.allclose(coca.captioning_loss(changed, tokens), expected)


def test_coca_loss_weights_the_two_terms():
    """[CoCa Eq. 4] with the paper's λ_Con = 1, λ_Cap = 2 [CoCa §4.1]."""
    config = coca.Config.paper()
    got = coca.coca_loss(torch.tensor(0.5), torch.tensor(3.0), config.lambda_con,
                         config.lambda_cap)
    assert got.item() == pytest.approx(1.0 * 0.5 + 2.0 * 3.0)


# --- SCST [Rennie et al. 2017; Oscar §5.1] -----------------------------------------------------

def test_scst_loss_is_the_self_critical_reinforce_of_its_equation():
    """L = -(1/(B·n)) Σ_b Σ_i (r_bi - r̂_b) · mean_t log p(w^{bi}_t), as a loop; its gradient
    raises the log-probability of a sample that beats the greedy caption and lowers one that
    does not; the rewards carry no gradient."""
    from shared.losses import scst_loss

    torch.manual_seed(0)
    mean_logprob = (-torch.rand(3, 4) * 3).requires_grad_()  # (B, n)
    reward = torch.rand(3, 4) * 2
    baseline = torch.rand(3)
    total = 0.0
    for b in range(3):
        for i in range(4):
            total += -(reward[b, i] - baseline[b]) * mean_logprob[b, i]
    expected = total / 12
    loss = scst_loss(mean_logprob, reward, baseline)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = mean_logprob.grad
    advantage = reward - baseline[:, None]
    assert torch.allclose(grad, -advantage / 12)
    assert ((grad < 0) == (advantage > 0)).all()  # gradient descent raises the better samples
    assert scst_loss(mean_logprob, torch.ones(3, 4), torch.ones(3)).item() == 0  # no advantage
