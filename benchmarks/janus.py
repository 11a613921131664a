"""Janus speed: our engine vs transformers' JanusForConditionalGeneration with the same random weights.

Measures, for each implementation in one run (ratios printed side by side):
  - understanding decode tokens/s at batch 1 and 8 (time of N new tokens minus time of 1, so prefill is excluded);
  - text-to-image generation time for all image tokens (576 at the real sizes) with CFG (2 rows per image).

  python benchmarks/janus.py                       # CPU, small config (default)
  python benchmarks/janus.py --device cuda --config 1.3b 7b --dtype bf16
transformers is only a reference here; the engine never imports it.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from jodi_core.janus.config import JANUS_1_3B, JANUS_PRO_7B, JanusConfig, LlamaConfig, SigLIPConfig, VQConfig  # noqa: E402
from jodi_core.janus.generate import janus_generate_codes, janus_understand_tokens  # noqa: E402
from jodi_core.janus.keys import original_to_hf  # noqa: E402
from jodi_core.janus.model import JanusModel  # noqa: E402
from jodi_core.janus.processor import ImagePreprocessConfig, JanusProcessor, JanusTokenizer  # noqa: E402

# Small CPU config: a real-shaped pipeline (576 image tokens, 16384-entry codebook, 32k vocab) with a narrow LM.
CPU_SMALL = JanusConfig(
    vision=SigLIPConfig(image_size=384, patch_size=16, width=64, depth=1, num_heads=1, mlp_hidden=128),
    language=LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8),
    vq=VQConfig(codebook_size=16384, codebook_dim=8, z_channels=64, base_channels=32, channel_mult=(1, 1, 2, 2, 4)),
    gen_head_hidden=512,
    gen_grid=24,
)  # fmt: skip
CONFIGS = {"small": CPU_SMALL, "1.3b": JANUS_1_3B, "7b": JANUS_PRO_7B}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_ours(cfg: JanusConfig, device, dtype, seed: int) -> JanusModel:
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusModel(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def hf_config(cfg: JanusConfig, tok: JanusTokenizer):
    from transformers import JanusConfig as HFJanusConfig

    lm, v, vq = cfg.language, cfg.vision, cfg.vq
    return HFJanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
            intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
            max_position_embeddings=lm.max_position_embeddings, rms_norm_eps=lm.rms_norm_eps,
            rope_theta=lm.rope_theta, tie_word_embeddings=False,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        ),
        vision_config=dict(
            hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, mlp_ratio=v.mlp_hidden / v.width, projection_dim=lm.hidden_size,
            num_image_tokens=v.num_patches,
        ),
        vq_config=dict(
            embed_dim=vq.codebook_dim, num_embeddings=vq.codebook_size, latent_channels=vq.z_channels,
            base_channels=vq.base_channels, channel_multiplier=list(vq.channel_mult), num_res_blocks=vq.num_res_blocks,
            projection_dim=lm.hidden_size, image_token_embed_dim=lm.hidden_size,
        ),
        image_token_id=tok.image_id,
        tie_word_embeddings=False,
    )  # fmt: skip


def build_hf(cfg: JanusConfig, ours: JanusModel, tok: JanusTokenizer, device, dtype):
    from transformers import JanusForConditionalGeneration

    with torch.device(device):
        model = JanusForConditionalGeneration(hf_config(cfg, tok)).to(dtype)
    result = model.load_state_dict(original_to_hf(ours.state_dict()), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("model.vqmodel.encoder.", "model.vqmodel.quant_conv."))]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weight transfer failed: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval().requires_grad_(False)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def now(device) -> float:
    """Wall time on GPU; on CPU the process's CPU time, so that other load on a shared machine does not count."""
    return time.perf_counter() if torch.device(device).type == "cuda" else time.process_time()


def timed(fn, device) -> float:
    sync(device)
    t0 = now(device)
    fn()
    sync(device)
    return now(device) - t0


class StepClock:
    """Timestamps taken once per decoding step (our progress callback / a never-firing stopping criterion for
    transformers, which it evaluates after every step)."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, *args):
        sync(self.device)
        self.stamps.append(now(self.device))
        if len(args) == 2 and isinstance(args[0], torch.Tensor):  # stopping-criterion form: "do not stop"
            return torch.zeros(args[0].shape[0], dtype=torch.bool, device=args[0].device)
        return None

    def rate(self, batch: int) -> float:
        """Tokens/s over the steps between the first and the last stamp (prefill excluded)."""
        return batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def decode_rates(ours: JanusModel, hf, batch: int, new_tokens: int, device, repeats: int) -> tuple[float, float]:
    from transformers import StoppingCriteriaList

    processor = ours.processor
    tok = processor.tokenizer
    g = torch.Generator().manual_seed(batch)
    images = [[torch.rand(3, 64, 64, generator=g)] for _ in range(batch)]
    questions = ["Describe this image in detail." if i % 2 else "What is in the picture?" for i in range(batch)]
    prompt = processor.understanding_batch(questions, images)
    inputs = dict(
        input_ids=prompt.input_ids.to(device),
        attention_mask=prompt.attention_mask.long().to(device),
        pixel_values=prompt.pixels.to(device, ours.dtype),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    eos = tok.eos_id
    tok.eos_id = -1  # random weights: never stop early, decode exactly new_tokens
    best_ours = best_hf = 0.0
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms up both
                clock = StepClock(device)
                janus_understand_tokens(ours, images, questions, max_new_tokens=new_tokens, callback=clock)
                best_ours = max(best_ours, clock.rate(batch))
                clock = StepClock(device)
                hf.generate(**inputs, stopping_criteria=StoppingCriteriaList([clock]))
                best_hf = max(best_hf, clock.rate(batch))
    finally:
        tok.eos_id = eos
    return best_ours, best_hf


def generation_times(ours: JanusModel, hf, parallel: int, device, repeats: int) -> tuple[float, float]:
    from transformers import GenerationConfig

    tok = ours.processor.tokenizer
    prompt = "A portrait of a young girl, masterpiece, film grained, best quality."
    ids = torch.tensor([ours.processor.generation_ids(prompt)], device=device).repeat(parallel, 1)
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=1.0, guidance_scale=5.0, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, generation_kwargs={"boi_token_id": tok.boi_id},
    )  # fmt: skip

    def run_ours():
        codes = janus_generate_codes(ours, prompt, cfg_weight=5.0, temperature=1.0, parallel_size=parallel)
        ours.decode_image_codes(codes)

    def run_hf():
        with torch.inference_mode():
            codes = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gen_cfg)
            hf.decode_image_tokens(codes)

    best_ours = best_hf = float("inf")
    for _ in range(repeats):  # interleaved, so that drifting machine load hits both alike
        best_ours = min(best_ours, timed(run_ours, device))
        best_hf = min(best_hf, timed(run_hf, device))
    return best_ours, best_hf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", nargs="+", default=None, choices=sorted(CONFIGS), help="default: small on CPU, 1.3b and 7b on GPU")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default 32 CPU, 128 GPU)")
    parser.add_argument("--parallel", type=int, default=1, help="images per generation run")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 2 CPU, 3 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args(argv)

    from janus_tiny import build_tiny_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its generate() warns about every max_length / min_length default

    gpu = torch.device(args.device).type == "cuda"
    configs = args.config or (["1.3b", "7b"] if gpu else ["small"])
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    new_tokens = args.new_tokens or (128 if gpu else 32)
    repeats = args.repeats or (3 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        build_tiny_tokenizer().save(str(tok_path))
        tokenizer = JanusTokenizer(tok_path)

    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads; times are process CPU time)"
    print(f"device: {device_name}; dtype {dtype}; torch {torch.__version__}")
    for name in configs:
        cfg = CONFIGS[name]
        ours = build_ours(cfg, args.device, dtype, seed=0)
        ours.processor = JanusProcessor(tokenizer, ImagePreprocessConfig(image_size=cfg.vision.image_size), cfg.vision.num_patches)
        hf = build_hf(cfg, ours, tokenizer, args.device, dtype)
        lm = cfg.language
        print(f"\n[{name}] LM {lm.num_layers} layers x {lm.hidden_size}, vocab {lm.vocab_size}; {cfg.gen_image_tokens} image tokens")
        print(f"{'measure':<34}{'ours':>12}{'transformers':>14}{'ours/hf':>10}")
        for b in args.batches:
            mine, ref = decode_rates(ours, hf, b, new_tokens, args.device, repeats)
            print(f"{f'decode tok/s, batch {b}':<34}{mine:>12.1f}{ref:>14.1f}{mine / ref:>9.2f}x")
        if not args.skip_generation:
            mine, ref = generation_times(ours, hf, args.parallel, args.device, repeats)
            label = f"t2i {cfg.gen_image_tokens} tok + VQ, P={args.parallel} (s)"
            print(f"{label:<34}{mine:>12.2f}{ref:>14.2f}{ref / mine:>9.2f}x")
        del ours, hf
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
