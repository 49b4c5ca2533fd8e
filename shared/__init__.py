"""Building blocks shared by the four paper files (oscar.py, uniter.py, virtex.py, coca.py).

Plain modules, imported explicitly, e.g. `from shared.attention import MultiHeadAttention`:

    masks.py        boolean "may attend" masks (True = query i may attend to key j)
    attention.py    multi-head attention: the explicit math path and the fused SDPA path
    transformer.py  post-LN / pre-LN encoder and decoder blocks, BERT embeddings and pooler
    tokenizer.py    BERT-style WordPiece tokenizer on `tokenizers`
    world.py        the procedural synthetic world (images, captions, regions, VQA, checker)
    data.py         turning world examples into batches of tensors
    metrics.py      BLEU, CIDEr-D, recall@K, VQA accuracy, top-1, caption truth rate
    decoding.py     greedy, beam search and nucleus sampling over a next-token function
"""
