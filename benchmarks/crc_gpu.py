"""The device chunk-CRC check alone (kernel-only numbers, labelled as such): block-size sweep on a
Llama-3.1-8B-geometry ``.kvz`` of random KV (32 layers, 8 KV heads, head_dim 128; adaptive, quality 1.5), against
the host check (zlib on ``host_threads()`` threads) of the same bytes.

    python benchmarks/crc_gpu.py [--tokens 32768]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def timed(fn: Any, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - a)
    return sorted(ts)[n // 2] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvtool
    from kvtool.arch import arch_info
    from kvtool.codecs import crc
    from kvtool.codecs.device_decode import HostChecks, read_data
    from kvtool.codecs.kvz import CodecSettings, KvzFile
    from kvtool.kernels.crc_triton import block_crcs_triton, combine_triton

    t = args.tokens
    cfg = LlamaConfig(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=8, head_dim=128,
                      hidden_size=64, intermediate_size=64, vocab_size=1000,
                      max_position_embeddings=131072)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = [tuple(torch.randn(1, 8, t, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
          for _ in range(32)]  # fmt: skip
    fp = {"id": "random-llama", "config_digest": arch_info(cfg).digest(), "weights_digest": "sha256:" + "0" * 64}

    class Tok:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0}

    blob = kvtool.encode_kv(model, kv, torch.randint(0, 1000, (t,)), settings=CodecSettings(quality=1.5),
                            fingerprint=fp, tokenizer=Tok())  # fmt: skip
    del kv
    kvz = KvzFile(torch.frombuffer(bytearray(blob), dtype=torch.uint8).pin_memory())
    data = read_data(kvz, pin=True)
    dev = crc.padded_bytes(data.numel(), torch.device("cuda"))
    dev.copy_(data)
    print(f"{len(blob)} bytes, {len(kvz.chunks)} chunks (kernel-only timings, medians of 5)")
    for block in (1024, 2048, 4096, 8192, 16384):
        plan = crc.plan_chunk_crcs(kvz, torch.device("cuda"), block)
        ok = bool((crc.chunk_crcs(dev, plan, "triton") == plan.expected).all())
        crcs = block_crcs_triton(dev, plan)
        print(f"block {block:6d} B: equal to the recorded CRCs {ok}; plan {timed(lambda b=block: crc.plan_chunk_crcs(kvz, torch.device('cuda'), b)):.2f} ms, "  # noqa: E501
              f"block CRCs {timed(lambda p=plan: block_crcs_triton(dev, p)):.2f} ms, "
              f"fold {timed(lambda p=plan, c=crcs: combine_triton(c, p)):.2f} ms ({plan.start.numel()} blocks)")

    def host() -> None:
        checks = HostChecks(kvz, data)
        checks.run()
        checks.result()

    print(f"host zlib threads: {timed(host):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
