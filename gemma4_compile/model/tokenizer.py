"""A small real tokenizer for random checkpoints: byte-level BPE trained on a built-in text, Gemma's ids.

Gemma's special tokens keep their released ids (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4,
`<start_of_turn>`=105, `<end_of_turn>`=106; 5..104 are `<unusedN>`), so the presets' eos ids (1, 106) mean
what they mean in Gemma. Learned tokens follow; unused ids up to the preset's vocabulary size are filled with
`<unusedN>` entries no merge produces, so the tokenizer covers exactly `vocab_size` ids. Training is
deterministic, so the same preset always writes the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import CheckpointError
from .config import Gemma4Spec

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
END_OF_TURN_ID = 106
MAX_MERGES = 2000  # the built-in text has far fewer pairs worth merging; more ids are filler

# Gemma's turn format: `<start_of_turn>{user|model}\n...<end_of_turn>\n`; a system message joins the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = '' %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('user', 'assistant', 'model') %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] in ('assistant', 'model') else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if loop.first %}{{ system }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CORPUS = """\
Gemma is a family of lightweight, state-of-the-art open models built from the same research and technology.
The model reads a prompt, one token at a time, and writes the answer token by token until the end of its turn.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Compile the checkpoint to ONNX, build a TensorRT engine for your GPU, validate it against PyTorch, then serve it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & * + = < >
def main():\n    print("hello, world")\n    return 0\n
The quick brown fox jumps over the lazy dog. A sliding window keeps the last tokens; a global layer sees them all.
"""


def special_tokens(vocab_size: int) -> list[str]:
    """Special tokens in id order: ids 0..106 as in Gemma."""
    if vocab_size <= END_OF_TURN_ID + 256:
        raise CheckpointError(f"vocab_size {vocab_size} is too small for Gemma's special ids and 256 bytes")
    unused = [f"<unused{i}>" for i in range(END_OF_TURN_ID - 6)]
    return [PAD, EOS, BOS, UNK, MASK, *unused, START_OF_TURN, END_OF_TURN]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE of exactly `vocab_size` ids; encoding adds `<bos>` like Gemma's tokenizer."""
    specials = special_tokens(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size = min(vocab_size, len(specials) + 256 + MAX_MERGES)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, specials.index(BOS))]
    )
    return _fill_vocab(tok, vocab_size, first_unused=END_OF_TURN_ID - 6)


def _fill_vocab(tok: Tokenizer, vocab_size: int, first_unused: int) -> Tokenizer:
    """Pad the BPE vocabulary with `<unusedN>` ids (never produced by a merge) up to `vocab_size`."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for i, new_id in enumerate(range(len(vocab), vocab_size)):
        vocab[f"<unused{first_unused + i}>"] = new_id
    return Tokenizer.from_str(json.dumps(data))


def tokenizer_files(spec: Gemma4Spec) -> dict[str, str]:
    """File name -> text of the tokenizer, its config, the chat template and the generation config."""
    eos = list(spec.eos_token_id) if isinstance(spec.eos_token_id, (list, tuple)) else [spec.eos_token_id]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "padding_side": "left",
    }
    generation = {
        "bos_token_id": 2,
        "eos_token_id": eos,
        "pad_token_id": 0,
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
    }
    return {
        "tokenizer.json": build_tokenizer(spec.vocab_size).to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "chat_template.jinja": CHAT_TEMPLATE,
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
    }


def write_tokenizer(spec: Gemma4Spec, directory: Path) -> list[str]:
    """Write the tokenizer files into `directory` (a checkpoint being written); -> their names."""
    files = tokenizer_files(spec)
    for name, text in files.items():
        (directory / name).write_text(text)
    return list(files)
