"""Building blocks for the four paper files (oscar.py, uniter.py, virtex.py, coca.py) and train.py.

Plain modules, imported explicitly (`from shared.attention import MultiHeadAttention`). Nothing
here imports a paper file or train.py.

Models
    masks.py        boolean "may attend" masks (True = query i may attend to key j)
    attention.py    multi-head attention: the explicit math path and the fused SDPA path
    transformer.py  post-LN / pre-LN encoder and decoder blocks, BERT embeddings, pooler and
                    prediction heads
    bert.py         BERT from a Hugging Face checkpoint folder, on these blocks (--init_bert)
    ot.py           optimal transport by IPOT, batched (UNITER's word-region alignment only)
    losses.py       the VQA loss that UNITER and Oscar share; SCST's self-critical loss
    decoding.py     greedy, beam search, nucleus sampling and sampling with gradients (SCST)
                    over a next-token function; the key/value cache helpers of the captioners
Data
    tokenizer.py    BERT's WordPiece (trained, or a vocab.txt) and CLIP's byte-level BPE, on
                    `tokenizers`
    world.py        the procedural synthetic world (images, captions, regions, VQA, checker)
    data.py         world examples -> tensors and batches; the step-indexed loader
    augment.py      VirTex's crop / flip (left <-> right in the caption) / colour jitter
                    (VirTex only; kept here because it is 360 lines of image code)
    folders.py      corpora on disk behind the world's interface (--data)
    convert.py      the official UNITER / Oscar region files -> folders.py's layout (CLI)
    roi.py          RoIAlign from primitives and pooled box features (extract.py regions)
    vqa.py          VQA v2's question / annotation files, answer vocabulary, soft scores and
                    the accuracy per answer type
Evaluation
    metrics.py      BLEU, CIDEr-D (also per caption, CiderD), recall@K, VQA accuracy (the
                    evaluation server's), top-1, caption truth rate
    evaluate.py     world evaluation pieces each paper's `evaluate` maps onto its keys; SCST's
                    CIDEr-D reward (ScstReward)
    probe.py        the linear probe of frozen image features (CoCa, VirTex)
    benchmarks.py   evaluation on data on disk: Karpathy captioning and retrieval, VQA v2
                    (train.py --val_data, infer.py karpathy / vqa)
Training
    config.py       checks of the recipe fields every paper's Config shares
    optim.py        AdamW parameter groups, the fused flag, the learning-rate schedule
    checkpoint.py   plain-data checkpoints (weights-only reads), atomic writes, encoder-strict
                    fine-tuning loads, RNG states
    distributed.py  torchrun's launch, the process group, a gather with gradients (DDP)
    monitor.py      loss-term means and the NaN/inf guard without syncs; MFU; the progress
                    line; metrics.jsonl, progress.jsonl and TensorBoard (RunLog); SIGTERM /
                    Ctrl-C handling
    cli.py          the command line generated from dataclasses; one-line errors
"""
