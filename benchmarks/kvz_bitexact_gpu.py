"""Bit-exactness of the codec across machines and backends, on real SmolLM2-135M KV (no weights needed on the GPU).

Step 1, here on the CPU machine (the real model): capture a prefix's KV (``kvtool capture ... --store-dtype
float32``), then write the reference files with the CPU pipeline::

    python benchmarks/kvz_bitexact_gpu.py write --capture kv.safetensors --calibration pca.kvcal.safetensors --out D

Step 2, on the GPU machine (carry D: the capture, the reference files, the calibration and the model's config)::

    python benchmarks/kvz_bitexact_gpu.py check --dir D

The check rebuilds the cache on the GPU from the captured tensors, with a random-weight model of the same config
(RoPE, the only part of the model the codec uses, depends on the config alone), encodes it with the Triton backend
(adaptive files: transform and coding on the GPU) and with the torch backend (transform on the CPU) on that
machine, and compares every chunk tensor with the reference written on the CPU machine (the headers differ only by
the tokenizer and weights digests, which the GPU machine does not have); then it decodes each file with the device
pipeline and the CPU pipeline and reports the largest difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

MODES = ("adaptive", "calibrated", "lossless")


def _cache(model, cap, device: str = "cpu"):
    from kvtool.cache_restore import restore_cache

    k, v, ids = cap.tensors["k"], cap.tensors["v"], cap.tensors["input_ids"]
    return restore_cache(model, [(k[i][None].float(), v[i][None].float()) for i in range(k.shape[0])],
                         int(ids.numel()), torch.device(device), torch.float32), ids  # fmt: skip


def _settings(mode: str):
    from kvtool.codecs.kvz import CodecSettings

    return CodecSettings(mode=mode, quality=0.5, level=-1)


def write(args: argparse.Namespace) -> int:
    from kvtool.artifacts import read_artifact
    from kvtool.codecs.kvz import encode_cache
    from kvtool.models import load_model, resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m", "cpu", "float32")
    cap = read_artifact(args.capture)
    cal = read_artifact(args.calibration) if args.calibration else None
    cache, ids = _cache(lm.model, cap)
    for mode in MODES:
        if mode == "calibrated" and cal is None:
            continue
        encode_cache(lm, ids, cache, _settings(mode), out / f"{mode}.kvz", cal if mode == "calibrated" else None,
                     backend="torch")  # fmt: skip
    shutil.copy(args.capture, out / "kv.safetensors")
    if cal is not None:
        shutil.copy(args.calibration, out / "cal.safetensors")
    files = resolve_model("smollm2-135m")
    from kvtool.models import _converted_gguf_folder

    shutil.copy(_converted_gguf_folder(files) / "config.json", out / "config.json")
    (out / "fingerprint.json").write_text(json.dumps(lm.fingerprint))
    print("reference files in", out)
    return 0


class _Tok:
    def __init__(self, digest: str):
        self.digest = digest

    def get_vocab(self) -> dict[str, int]:  # only its digest is recorded; a placeholder vocabulary here
        return {"kvtool-bitexact": 0}


def check(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvtool.arch import arch_info
    from kvtool.artifacts import read_artifact
    from kvtool.codecs.kvz import KvzFile, decode_kvz, encode_cache

    d = Path(args.dir)
    cfg = AutoConfig.from_pretrained(d)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device, torch.float32).eval()

    class LM:
        pass

    lm = LM()
    lm.model, lm.arch = model, arch_info(model.config)
    lm.fingerprint = json.loads((d / "fingerprint.json").read_text())
    lm.tokenizer = _Tok("")
    print("config digest equal to the CPU machine's:", lm.arch.digest() == lm.fingerprint["config_digest"])
    cap = read_artifact(d / "kv.safetensors")
    cal = read_artifact(d / "cal.safetensors") if (d / "cal.safetensors").exists() else None
    # the cache on the GPU: the Triton backend then codes adaptive chunks entirely there (RoPE inverted, statistics,
    # symbols, rANS), the torch backend transforms on the CPU; both must give the CPU machine's bytes
    cache, ids = _cache(model, cap, args.device)
    ok = True
    for mode in MODES:
        ref_path = d / f"{mode}.kvz"
        if not ref_path.exists():
            continue
        c = cal if mode == "calibrated" else None
        paths = {}
        for backend in ("triton", "torch"):
            paths[backend] = Path(f"/tmp/bitexact-{mode}-{backend}.kvz")
            encode_cache(lm, ids, cache, _settings(mode), paths[backend], c, backend=backend)
        ref = KvzFile(ref_path)
        names = sorted(n for n in ref._header if n.startswith("chunk."))
        same = {}
        for backend, p in paths.items():
            got = KvzFile(p)
            same[backend] = all(_raw(ref, n) == _raw(got, n) for n in names) and set(names) == {
                n for n in got._header if n.startswith("chunk.")}
        files_equal = paths["triton"].read_bytes() == paths["torch"].read_bytes()
        on_gpu = decode_kvz(KvzFile(paths["triton"]), model, c, device=device, dtype=torch.float32)
        on_cpu = decode_kvz(KvzFile(paths["triton"]), model, c)
        diff = max(float((a.keys.cpu() - b.keys).abs().max() / b.keys.abs().max().clamp_min(1e-30))
                   for a, b in zip(on_gpu, on_cpu, strict=True))  # fmt: skip
        diff_v = max(float((a.values.cpu() - b.values).abs().max() / b.values.abs().max().clamp_min(1e-30))
                     for a, b in zip(on_gpu, on_cpu, strict=True))  # fmt: skip
        print(f"{mode:10} chunks equal to the CPU machine's: triton {same['triton']}, torch {same['torch']}; "
              f"triton file == torch file: {files_equal}; GPU vs CPU decode max rel diff K {diff:.2e} V {diff_v:.2e}")
        ok &= same["triton"] and same["torch"] and files_equal
    print("bit-exact:", ok)
    return 0 if ok else 1


def _raw(kvz, name: str) -> bytes:
    begin, end = kvz._header[name]["data_offsets"]
    with kvz.path.open("rb") as f:
        f.seek(kvz._data_start + begin)
        return f.read(end - begin)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--capture", required=True)
    w.add_argument("--calibration")
    w.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--device", default="cuda")
    args = ap.parse_args()
    return write(args) if args.cmd == "write" else check(args)


if __name__ == "__main__":
    raise SystemExit(main())
