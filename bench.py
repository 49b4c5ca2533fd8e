"""Timing our models against other implementations at the same shapes, in one process.

    python bench.py --coca          # coca.CoCa vs open_clip's CoCa, one training step each
    python bench.py --resnet        # virtex.ResNet vs torchvision's resnet50, fwd + bwd
    python bench.py --ipot          # uniter.ipot batched vs a loop over the examples
    python bench.py --bert          # shared.bert.BertModel vs transformers.BertModel
    python bench.py --oscar_cache   # Oscar's cached caption decoding vs uncached
    python bench.py --coca_cache    # CoCa's cached caption decoding vs uncached
    python bench.py --virtex_cache  # VirTex's cached caption decoding vs uncached
    python bench.py --coca_generate # greedy captions of open_clip's coca_ViT-B-32 (random
                                    # weights, converted): ours (cached) vs open_clip's generate
    python bench.py --adamw         # AdamW on the CPU: fused kernel vs torch's loops
    python bench.py --step_memory   # peak memory of a training step, with and without
                                    # --grad_checkpointing (Linux: reads /proc/self/status)

Each comparison builds both models at the same shapes, warms them up, then times full training
steps (forward, loss, backward, AdamW step) alternately, A B A B ..., so that a change in machine
load hits both sides alike, and prints the medians and their ratio (ours / theirs; < 1 = we are
faster). `--ipot` times one of our functions two ways instead (batched vs a per-example loop,
same alternation) and prints the speedup. Libraries that are not installed are skipped with a
message: they are benchmark-only dependencies, never imported by the models. open_clip needs
torchvision, and torchvision does not import beside the CPU torch 2.13 wheel; use a separate
virtualenv for both:

    python -m venv /tmp/venv-oc
    /tmp/venv-oc/bin/pip install torch==2.14.1 torchvision==0.29.1 -r requirements-bench.txt
    /tmp/venv-oc/bin/python bench.py --coca --resnet

Results go to RESULTS.md with the device, shapes, command and date.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch


def time_alternately(steps: dict, rounds: int, warmup: int) -> dict:
    """Run each step function `warmup` times, then `rounds` times alternately; median seconds."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def coca_vs_open_clip(batch: int = 32, image: int = 64, patch: int = 8, width: int = 256,
                      vision_layers: int = 4, text_layers: int = 2, heads: int = 4,
                      queries: int = 256, vocab: int = 1000, tokens: int = 32, rounds: int = 10,
                      warmup: int = 3) -> None:
    """One CoCa training step: coca.CoCa vs open_clip.CoCa with the same sizes."""
    if importlib.util.find_spec("open_clip") is None:
        print("skipped coca vs open_clip: open_clip is not installed (see the module docstring)")
        return
    import open_clip
    from open_clip.loss import CoCaLoss

    import coca

    torch.manual_seed(0)
    images = torch.randn(batch, 3, image, image)
    text = torch.randint(5, vocab, (batch, tokens))  # no pads: both sides see full sequences

    config = coca.Config(image_size=image, patch_size=patch, patch_stem="linear",
                         pooler_layout="parallel", vision_width=width, vision_layers=vision_layers, vision_heads=heads,
                         n_caption_queries=queries, text_width=width, text_heads=heads,
                         unimodal_layers=text_layers, multimodal_layers=text_layers,
                         vocab_size=vocab, max_text_len=tokens, embed_dim=width)
    ours = coca.CoCa(config)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    theirs = open_clip.CoCa(
        embed_dim=width,
        vision_cfg=dict(image_size=image, patch_size=patch, width=width, layers=vision_layers,
                        head_width=width // heads, attentional_pool=True,
                        attn_pooler_queries=queries, attn_pooler_heads=heads,
                        output_tokens=True),
        text_cfg=dict(context_length=tokens, vocab_size=vocab, width=width, heads=heads,
                      layers=text_layers, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=tokens, vocab_size=vocab, width=width, heads=heads,
                            layers=text_layers, n_queries=queries, attn_pooler_heads=heads))
    theirs_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        loss = ours({"images": images, "tokens": text})["loss"]
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def step_theirs():
        out = theirs(images, text)
        clip_loss, caption_loss = theirs_loss(out["image_features"], out["text_features"],
                                              out["logits"], out["labels"], out["logit_scale"])
        (clip_loss + caption_loss).backward()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)

    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    medians = time_alternately({"ours": step_ours, "open_clip": step_theirs}, rounds, warmup)
    print(f"CoCa training step, batch {batch}, image {image}/{patch}, width {width}, vision "
          f"{vision_layers} layers, text {text_layers}+{text_layers}, {queries} queries, vocab "
          f"{vocab}, {tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  coca.CoCa      {medians['ours'] * 1e3:8.1f} ms/step  ({n_ours / 1e6:.2f}M params)")
    print(f"  open_clip.CoCa {medians['open_clip'] * 1e3:8.1f} ms/step  ({n_theirs / 1e6:.2f}M params)")
    print(f"  ratio ours / open_clip = {medians['ours'] / medians['open_clip']:.3f}")


def resnet_vs_torchvision(batch: int = 8, image: int = 224, rounds: int = 10,
                          warmup: int = 3) -> None:
    """ResNet-50 forward + backward (no optimizer): virtex.ResNet vs torchvision.models.resnet50
    without its fc, same input, both in train mode (batch statistics in BatchNorm)."""
    if importlib.util.find_spec("torchvision") is None:
        print("skipped resnet vs torchvision: torchvision is not installed (see the docstring)")
        return
    import torchvision

    import virtex

    torch.manual_seed(0)
    images = torch.randn(batch, 3, image, image)
    ours = virtex.ResNet(virtex.Config.paper()).train()
    theirs = torchvision.models.resnet50(zero_init_residual=True).train()
    theirs.fc = torch.nn.Identity()
    theirs.avgpool = torch.nn.Identity()  # both return layer4, theirs flattened
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, same weights

    # ours runs channels-last (see virtex.ResNet); a copy of torchvision's in that layout too, so
    # that the comparison separates the layout from everything else
    theirs_cl = torchvision.models.resnet50().train()
    theirs_cl.fc, theirs_cl.avgpool = torch.nn.Identity(), torch.nn.Identity()
    theirs_cl.load_state_dict(ours.state_dict(), strict=True)
    theirs_cl = theirs_cl.to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def step(model, x):
        def fn():
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
        return fn

    medians = time_alternately({"ours": step(ours, images), "torchvision": step(theirs, images),
                                "torchvision_cl": step(theirs_cl, images_cl)}, rounds, warmup)
    print(f"ResNet-50 forward + backward, batch {batch}, {image} px, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    print(f"  virtex.ResNet         {medians['ours'] * 1e3:8.1f} ms/step")
    print(f"  torchvision resnet50  {medians['torchvision'] * 1e3:8.1f} ms/step")
    print(f"  torchvision resnet50, channels-last {medians['torchvision_cl'] * 1e3:8.1f} ms/step")
    print(f"  ratio ours / torchvision = {medians['ours'] / medians['torchvision']:.3f}; "
          f"ours / torchvision channels-last = {medians['ours'] / medians['torchvision_cl']:.3f}")


def ipot_batched_vs_loop(batch: int = 32, text: int = 35, regions: int = 50, iters: int = 50,
                         rounds: int = 20, warmup: int = 3, threads: int = 1) -> None:
    """UNITER's IPOT (the WRA transport plans, fp32): one batched call over (batch, text,
    regions) vs a Python loop calling the same uniter.ipot on one example at a time, each cut to
    its real tokens and regions (the loop does no work on padding). Two layouts: every example
    full size, and ragged (text lengths from text/2 to text, region counts from regions/5 to
    regions), where the batched call also works on the padding. Where POT is installed, a third
    contender: POT's ot.sinkhorn (entropic OT, reg 0.5, the same 50 iterations, no early stop,
    its torch backend on the same tensors) called once per example: another algorithm, so only
    the time is compared, as the library a user would otherwise reach for.

    `threads`: torch's intra-op threads during the timing (restored after). One by default: on
    the 2-core dev machine, while another job kept both cores busy, 2 threads made the batched
    call 1.9 s instead of 3 ms (an OpenMP thread that loses its core stalls every operation)."""
    import uniter

    if importlib.util.find_spec("ot") is None:
        ot = None
        print("POT is not installed (pip install -r requirements-bench.txt): skipping the "
              "ot.sinkhorn column")
    else:
        import ot
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        cost = 2 * torch.rand(batch, text, regions)  # (B, T, N), like 1 - cos in [0, 2]
        ragged = (torch.randint(max(text // 2, 1), text + 1, (batch,)),
                  torch.randint(max(regions // 5, 1), regions + 1, (batch,)))  # (B,), (B,)
        full = (torch.full((batch,), text), torch.full((batch,), regions))
        print(f"IPOT, batch {batch}, up to {text} text x {regions} regions, {iters} iterations, "
              f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
        for layout, (n_text, n_regions) in [("full", full), ("ragged", ragged)]:
            text_mask = torch.arange(text)[None, :] < n_text[:, None]  # (B, T)
            region_mask = torch.arange(regions)[None, :] < n_regions[:, None]  # (B, N)
            sizes = list(zip(n_text.tolist(), n_regions.tolist()))

            def batched():
                return uniter.ipot(cost, text_mask, region_mask, iters=iters)

            def loop():
                return [uniter.ipot(cost[b:b + 1, :nx, :ny], text_mask[b:b + 1, :nx],
                                    region_mask[b:b + 1, :ny], iters=iters)
                        for b, (nx, ny) in enumerate(sizes)]

            def pot_sinkhorn():  # POT's entropic solver, its torch backend, one example a call
                return [ot.sinkhorn(torch.full((nx,), 1 / nx), torch.full((ny,), 1 / ny),
                                    cost[b, :nx, :ny], reg=0.5, numItermax=iters, stopThr=0.0,
                                    warn=False)
                        for b, (nx, ny) in enumerate(sizes)]

            plan = batched()
            gap = max((plan[b, :nx, :ny] - one[0]).abs().max().item()
                      for b, ((nx, ny), one) in enumerate(zip(sizes, loop())))
            steps = {"batched": batched, "loop": loop}
            if ot is not None:
                steps["pot"] = pot_sinkhorn
            medians = time_alternately(steps, rounds, warmup)
            speedup = medians["loop"] / medians["batched"]
            print(f"  {layout:6}  batched {medians['batched'] * 1e3:7.2f} ms   per-example loop "
                  f"{medians['loop'] * 1e3:7.2f} ms   speedup {speedup:.1f}x   "
                  f"(largest plan difference {gap:.1e})")
            if ot is not None:
                print(f"          POT ot.sinkhorn per example {medians['pot'] * 1e3:7.2f} ms   "
                      f"ratio batched IPOT / POT {medians['batched'] / medians['pot']:.2f}")
    finally:
        torch.set_num_threads(previous_threads)


def bert_vs_transformers(batch: int = 32, tokens: int = 45, width: int = 384, layers: int = 6,
                         heads: int = 6, vocab: int = 30522, rounds: int = 10,
                         warmup: int = 3) -> None:
    """One training step of the BERT encoder Oscar and UNITER run (tokens = 35 text + 10
    regions, the tiny layouts' order of magnitude, at MiniLM-like width): ours vs
    transformers.BertModel with the same config and the same weights, a quarter of each row
    padded."""
    if importlib.util.find_spec("transformers") is None:
        print("skipped bert vs transformers: transformers is not installed "
              "(pip install -r requirements-test.txt)")
        return
    import transformers

    from shared.bert import BertModel, hf_to_ours

    torch.manual_seed(0)
    ours = BertModel(vocab, width, layers, heads, 4 * width, dropout=0.1)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * width)
    theirs = transformers.BertModel(config, add_pooling_layer=True)  # default attention: sdpa
    ours.load_state_dict(hf_to_ours(theirs.state_dict(), layers))  # the same weights
    ids = torch.randint(5, vocab, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -tokens // 4:] = 0  # padding at the end of every row
    types = torch.zeros_like(ids)

    def step_fn(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            hidden, pooled = forward()
            loss = hidden.float().pow(2).mean() + pooled.float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    ours.train(), theirs.train()
    times = time_alternately({
        "ours": step_fn(ours, lambda: ours(ids, types, mask)),
        "transformers": step_fn(theirs, lambda: tuple(theirs(
            input_ids=ids, token_type_ids=types, attention_mask=mask)[:2]))},
        rounds, warmup)
    print(f"bert training step (B {batch}, T {tokens}, D {width}, {layers} layers, "
          f"{torch.get_num_threads()} threads): ours {times['ours'] * 1e3:.1f} ms, "
          f"transformers {times['transformers'] * 1e3:.1f} ms, "
          f"ratio {times['ours'] / times['transformers']:.2f}")


def _caption_step_maker(name: str, batch: int, tokens: int, preset: str):
    """(make_step(cached) -> a shared.decoding step_fn, label) for one captioner at `preset`
    with random weights and a vocabulary of 1,000; the image side is run once, here."""
    import dataclasses
    import importlib

    paper = importlib.import_module(name)
    base = getattr(paper.Config, preset)()
    regions = paper.INPUTS == "regions"  # a region captioner: Oscar's [MASK]-appending decoding
    if regions:
        config = dataclasses.replace(base, task="caption", max_gen_len=tokens, vocab_size=1000,
                                     max_caption_len=max(tokens + 2, 32))
    else:
        config = dataclasses.replace(base, max_text_len=max(tokens + 1, 32), vocab_size=1000)
    model = paper.build_model(config).eval()
    if regions:
        N, L = config.n_regions, 8  # 8 tags

        class Ids:  # the one id oscar.caption_step_fn reads from a tokenizer
            mask_id = 4

        states, real = model.context_states(
            torch.randint(5, config.vocab_size, (batch, L)), config.max_caption_len
            + torch.arange(L), torch.randn(batch, N, config.feature_dim + 6),
            torch.ones(batch, N, dtype=torch.bool))
        return (lambda cached: paper.caption_step_fn(model, Ids, states, real, cached),
                f"{N} regions + {L} tags")
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    context = model.caption_context(images)  # what the decoder cross-attends to
    return (lambda cached: model.next_token_logprobs(context, cached),
            f"{config.image_size} px images")


def coca_generate_vs_open_clip(name: str = "coca_ViT-B-32", batch: int = 4, seq_len: int = 21,
                               rounds: int = 3, warmup: int = 1) -> None:
    """Greedy captions of open_clip's released architecture `name` (random weights, fp32, eval),
    converted with coca.from_open_clip: our CoCa.generate (key/value cache) against open_clip's
    own generate (top-k 1 = greedy, which re-runs the text decoders over the whole prefix at
    every step; the image is encoded once on both sides). The end token is -1, which no model
    emits, so every row decodes seq_len - 1 tokens on both sides. Prints text tokens per second.

    open_clip 3.3's generate imports transformers' logit processors together with a beam
    search scorer that transformers 5 no longer has, and then disables all of them: the ones
    greedy decoding needs are put back from transformers, as tests/test_open_clip.py does."""
    if importlib.util.find_spec("open_clip") is None or importlib.util.find_spec(
            "transformers") is None:
        print("skipped coca generate vs open_clip: open_clip or transformers is not installed")
        return
    import open_clip
    import open_clip.coca_model as open_clip_coca
    import transformers

    import coca

    for processor in ("LogitsProcessorList", "TopKLogitsWarper", "MinLengthLogitsProcessor",
                      "RepetitionPenaltyLogitsProcessor", "MaxLengthCriteria",
                      "StoppingCriteriaList"):
        setattr(open_clip_coca, processor, getattr(transformers, processor))
    open_clip_coca._has_transformers = True
    open_clip_coca.GENERATION_TYPES["top_k"] = transformers.TopKLogitsWarper
    torch.manual_seed(0)
    theirs = open_clip.create_model(name).eval()
    with torch.no_grad():  # open_clip leaves some tensors uninitialised: draw every one anew
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10) +
                    (1.0 if p.ndim == 1 else 0.0))
    config, state = coca.from_open_clip(theirs.state_dict(), open_clip.get_model_config(name))
    ours = coca.CoCa(config).eval()
    ours.load_state_dict(state)
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    start, end = 49406, -1  # CLIP's <start_of_text>; an end no model emits

    @torch.no_grad()
    def ours_step():
        return ours.generate(images, start, end, max_len=seq_len, method="greedy")

    @torch.no_grad()
    def theirs_step():
        return theirs.generate(images, seq_len=seq_len, generation_type="top_k", top_k=1,
                               min_seq_len=1, repetition_penalty=1.0, sot_token_id=start,
                               eos_token_id=end, pad_token_id=0)

    assert torch.equal(ours_step()[:, :-1], theirs_step()[:, :-1])  # the same captions
    times = time_alternately({"ours": ours_step, "theirs": theirs_step}, rounds, warmup)
    tokens = batch * (seq_len - 1)
    print(f"{name} greedy captions (random weights, B {batch}, {seq_len - 1} tokens each, "
          f"{torch.get_num_threads()} threads): ours (cached) {tokens / times['ours']:.0f} tok/s "
          f"({times['ours']:.2f} s), open_clip generate {tokens / times['theirs']:.0f} tok/s "
          f"({times['theirs']:.2f} s), speedup {times['theirs'] / times['ours']:.2f}x")


def cached_vs_uncached(name: str, batch: int = 32, tokens: int = 30, preset: str = "small",
                       rounds: int = 5, warmup: int = 1) -> None:
    """Greedy decoding of `tokens` tokens for `batch` inputs, with the captioner's key/value
    cache (coca.TextDecoder.step, virtex.VirTex.step, oscar.Oscar.caption_step) vs recomputing
    the prefix every step. The end token is an id that never wins, so every row decodes all
    `tokens` steps; both paths must give the same tokens."""
    from shared import decoding

    torch.manual_seed(0)
    prefix = torch.full((batch, 1), 2)  # [CLS]
    with torch.no_grad():
        make_step, what = _caption_step_maker(name, batch, tokens, preset)
        runs = {label: (lambda cached=cached: decoding.greedy(
                    make_step(cached), prefix, 1 + tokens, end_id=-1))
                for label, cached in (("cached", True), ("uncached", False))}
        same = torch.equal(runs["cached"]()[0], runs["uncached"]()[0])
        times = time_alternately(runs, rounds, warmup)
    print(f"{name} {preset} greedy, {batch} x {tokens} tokens ({what}, "
          f"{torch.get_num_threads()} threads): cached {times['cached'] * 1e3:.0f} ms, "
          f"uncached {times['uncached'] * 1e3:.0f} ms, speedup "
          f"{times['uncached'] / times['cached']:.2f}x, same tokens: {same}")


def adamw_fused_vs_loops(rounds: int = 20, warmup: int = 5) -> None:
    """One AdamW update of each paper's `tiny` parameters (random gradients) three ways: torch's
    default on the CPU (a Python loop over the tensors, foreach=False), the multi-tensor
    foreach path, and the fused kernel that each paper's make_optimizer picks on CUDA and the CPU
    (shared.optim.fused_for)."""
    import importlib

    for name in ("coca", "virtex", "oscar", "uniter"):
        paper = importlib.import_module(name)
        torch.manual_seed(0)
        model = paper.build_model(paper.Config.tiny())
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        steps = {label: torch.optim.AdamW(params, lr=1e-4, **kwargs).step
                 for label, kwargs in (("single", {"foreach": False}),
                                       ("foreach", {"foreach": True}),
                                       ("fused", {"fused": True}))}
        times = time_alternately(steps, rounds, warmup)
        print(f"adamw {name} tiny ({sum(p.numel() for p in params) / 1e6:.2f}M parameters in "
              f"{len(params)} tensors, {torch.get_num_threads()} threads): single "
              f"{times['single'] * 1e3:.2f} ms, foreach {times['foreach'] * 1e3:.2f} ms, fused "
              f"{times['fused'] * 1e3:.2f} ms, fused / single "
              f"{times['fused'] / times['single']:.2f}")


def _resident_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit("error: --step_memory reads /proc/self/status (Linux only)")


def step_memory_child(name: str, checkpointed: bool, batch: int) -> None:
    """One forward + backward of the `small` preset on one world batch; prints the peak
    resident memory of the step above the memory held before it (model, batch, tokenizer)."""
    import dataclasses

    import train
    from shared.data import train_loader
    from shared.world import World

    run, paper, _ = train.parse_args(["--model", name, "--tokenizer_texts", "100"])
    config = train.make_config(paper, "small", {"batch_size": batch, "grad_accum_steps": 1,
                                                "grad_checkpointing": checkpointed})
    world_config = train.make_world_config(paper, config, 0)
    tokenizer = train.make_tokenizer(run, config, world_config)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = paper.build_model(config).train()
    dataset = paper.train_dataset(World(world_config, "train"), tokenizer, config)
    batch_ = next(iter(train_loader(dataset, batch, 0, paper.collate_fn)))
    before = _resident_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    model(batch_)["loss"].backward()
    print(f"{name:7s} small, batch {batch}, grad_checkpointing {str(checkpointed):5s}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, step peak "
          f"{_resident_mib('VmHWM') - before:.0f} MiB above {before:.0f} MiB")


def step_memory(batch: int = 32) -> None:
    """step_memory_child for each model, with and without checkpointing, each in a fresh
    process (a process's allocator keeps what an earlier step freed)."""
    import subprocess
    import sys

    for name in ("coca", "virtex", "uniter", "oscar"):
        for checkpointed in ("0", "1"):
            subprocess.run([sys.executable, __file__, "--step_memory_child", name, checkpointed,
                            str(batch)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coca", action="store_true", help="coca.CoCa vs open_clip's CoCa")
    parser.add_argument("--resnet", action="store_true",
                        help="virtex.ResNet vs torchvision's resnet50")
    parser.add_argument("--ipot", action="store_true",
                        help="uniter.ipot batched vs a per-example loop")
    parser.add_argument("--bert", action="store_true",
                        help="shared.bert.BertModel vs transformers.BertModel")
    parser.add_argument("--oscar_cache", action="store_true",
                        help="Oscar's cached caption decoding vs uncached")
    parser.add_argument("--coca_cache", action="store_true",
                        help="CoCa's cached caption decoding vs uncached")
    parser.add_argument("--virtex_cache", action="store_true",
                        help="VirTex's cached caption decoding vs uncached")
    parser.add_argument("--coca_generate", action="store_true",
                        help="greedy captions of open_clip's CoCa B/32, ours vs open_clip")
    parser.add_argument("--adamw", action="store_true",
                        help="AdamW on the CPU: the fused kernel vs torch's loops")
    parser.add_argument("--step_memory", action="store_true",
                        help="peak memory of a training step, with and without checkpointing")
    parser.add_argument("--step_memory_child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --ipot")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.step_memory_child:
        name, checkpointed, batch = args.step_memory_child
        return step_memory_child(name, checkpointed == "1", int(batch))
    if args.step_memory:
        step_memory()
    if not (args.step_memory or args.coca or args.resnet or args.ipot or args.bert or args.oscar_cache
            or args.coca_cache or args.virtex_cache or args.adamw or args.coca_generate):
        parser.error("choose a comparison: --coca, --resnet, --ipot, --bert, --oscar_cache, "
                     "--coca_cache, --virtex_cache, --adamw")
    if args.coca:
        coca_vs_open_clip(rounds=args.rounds)
    if args.resnet:
        resnet_vs_torchvision(rounds=args.rounds)
    if args.ipot:
        ipot_batched_vs_loop(rounds=args.rounds, threads=args.threads)
    if args.bert:
        bert_vs_transformers(rounds=args.rounds)
    if args.oscar_cache:
        cached_vs_uncached("oscar", rounds=args.rounds)
    if args.coca_cache:
        cached_vs_uncached("coca", rounds=args.rounds)
    if args.virtex_cache:
        cached_vs_uncached("virtex", rounds=args.rounds)
    if args.adamw:
        adamw_fused_vs_loops(rounds=args.rounds)
    if args.coca_generate:
        coca_generate_vs_open_clip(rounds=args.rounds)


if __name__ == "__main__":
    main()
