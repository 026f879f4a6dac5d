"""A tiny random-weights llama model in GGUF, small enough to write in a test.

No model can be downloaded on these machines, yet the llama.cpp integration test needs a file
``llama_cpp`` will load and run. This one has the llama architecture (2 layers, 64 wide, 4
heads) and a SentencePiece ("llama") vocabulary of 320 unique pieces: the three specials, the
128 ASCII byte-fallback tokens (so any ASCII prompt tokenizes, newlines included), and every
printable ASCII character, alone and after the word-start mark. Every token it can generate
decodes to valid UTF-8, so streamed chunks are never held back waiting for the rest of a
multi-byte character. The weights come from a fixed seed: the same file, and with a request
seed the same answer, every run.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYERS = 2
N_HEADS = 4
N_FF = 128
N_CTX = 512

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
WORD_START = "\u2581"  # SentencePiece's "▁": a piece that begins a word

# Plain "role: content" lines: every character is in the vocabulary below.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(128):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
    pieces = [WORD_START]
    for code in range(33, 127):
        pieces += [chr(code), WORD_START + chr(code)]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SentencePiece merges the highest-scoring pieces first: prefer the longer ones.
    scores = [0.0] * (3 + 128) + [float(len(piece)) for piece in pieces]
    assert len(set(tokens)) == len(tokens), "token strings must be unique"
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama_gguf(path: Path, seed: int = 1234, *, mean_pooling: bool = False) -> Path:
    """Write the model to ``path`` and return it. ``mean_pooling``: the model says its
    embeddings are the mean over the tokens, so a server started with embeddings on answers
    one vector per text (without it llama.cpp gives one vector per token)."""
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.5, size=shape).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("corral-tiny-random")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_rope_dimension_count(N_EMBD // N_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if mean_pooling:
        writer.add_pooling_type(gguf.PoolingType.MEAN)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are (rows, columns): GGUF stores them reversed, as ggml's ne[] expects.
    ones = np.ones(N_EMBD, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD))
    for layer in range(N_LAYERS):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones)
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
