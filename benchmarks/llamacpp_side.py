"""The llama.cpp side of `cpu_vs_llamacpp.py`: GGUF conversion, q4_0 quantization and a greedy decode loop.

Only this module imports llama_cpp (llama-cpp-python, pinned in benchmarks/requirements-llamacpp.txt), so the
benchmark can say in one line what is missing. The decode loop uses the low-level API: one `llama_batch` per
call, one sequence id per row, logits read for the last token of each row, argmax in numpy: the same work the
ORT side does per step.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from gemma4_compile.model.config import Gemma4Spec
from gemma4_compile.model.tokenizer import special_tokens

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
INSTALL_HINT = (
    "pip install -r benchmarks/requirements-llamacpp.txt "
    '(builds llama.cpp from source; CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2)'
)
CONVERT_TYPES = ("f32", "f16", "q8_0")  # written by convert_hf_to_gguf.py; q4_0 by llama_model_quantize
GGML_TYPE_F32 = 0


def sentencepiece_style_tokenizer(vocab_size: int) -> Tokenizer:
    """A Gemma-style tokenizer.json (SentencePiece BPE with byte fallback) with the project's special ids.

    llama.cpp's converter reads Gemma 4 vocabularies only in this form (`LlamaHfVocab`: BPE, byte_fallback,
    a Sequence decoder); init-random writes a byte-level BPE. The benchmark feeds token ids, never text, so
    only the vocabulary size and the special ids matter."""
    specials = special_tokens(vocab_size)
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "t", "\u2581t"]
    pieces += [f"\u2581t{i}" for i in range(vocab_size - len(pieces))]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "t")]  # llama.cpp refuses a BPE vocabulary without merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def conversion_dir(checkpoint: Path, spec: Gemma4Spec, out: Path) -> Path:
    """The checkpoint's weights and config (symlinked) beside a tokenizer llama.cpp's converter reads."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        link = out / name
        if not link.exists():
            link.symlink_to((checkpoint / name).resolve())
    sentencepiece_style_tokenizer(spec.vocab_size).save(str(out / "tokenizer.json"))
    return out


def convert(source: Path, llama_src: Path, outtype: str, outfile: Path) -> Path:
    """convert_hf_to_gguf.py from the llama.cpp that llama-cpp-python vendors (same version as the runtime)."""
    script = llama_src / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(source), "--outtype", outtype, "--outfile", str(outfile)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {' '.join(tail)}")
    return outfile


def quantize_q4_0(source: Path, outfile: Path, threads: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), ctypes.byref(params))
    if rc:
        raise RuntimeError(f"llama_model_quantize to q4_0 failed with {rc}")
    return outfile


class LlamaDecoder:
    """One llama.cpp context for `batch` rows of up to `max_len` tokens each (one sequence id per row)."""

    def __init__(self, gguf: Path, batch: int, max_len: int, threads: int, f32_cache: bool):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        # the CPU "extra" buffer types (AMX / repacked q4_0, q8_0 weights) segfault in the first llama_decode on
        # this machine (Xeon with AMX, in a VM; llama-cpp-python 0.3.36); f32 and f16 never use them
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        cp = lc.llama_context_default_params()
        per_row = -(-max_len // 256) * 256
        cp.n_ctx, cp.n_seq_max = per_row * batch, batch
        cp.n_batch = cp.n_ubatch = max(batch * max_len, 32)  # the whole prefill in one ubatch
        cp.n_threads = cp.n_threads_batch = threads
        if f32_cache:  # the f32 comparison keeps K/V in f32 as ours does (llama.cpp's default is f16)
            cp.type_k = cp.type_v = GGML_TYPE_F32
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot create a context for {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, 1)

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def step(self, ids: np.ndarray, start: int) -> np.ndarray:
        """[B, S] tokens at positions start.. -> last-position logits [B, V] (row b is sequence b)."""
        B, S = ids.shape
        b = self.batch
        b.n_tokens = B * S
        for r in range(B):
            for i in range(S):
                k = r * S + i
                b.token[k], b.pos[k], b.n_seq_id[k] = int(ids[r, i]), start + i, 1
                b.seq_id[k][0], b.logits[k] = r, int(i == S - 1)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = [self.lc.llama_get_logits_ith(self.ctx, r * S + S - 1) for r in range(B)]
        return np.stack([np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy() for p in rows])


def version() -> str:
    import llama_cpp

    return json.dumps({"llama_cpp_python": llama_cpp.__version__})
