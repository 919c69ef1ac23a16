"""Loading teacher, student and tokenizers; freezing the teacher; vocabulary compatibility checks."""

import hashlib
import sys
from pathlib import Path

from common.errors import UserError, is_rank_zero

# Texts two tokenizers must split identically to count as "the same tokenizer".
_PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces,\ttabs\nand newlines\n\n",
    "Numbers 1234567 3.14159 -42 and symbols #@$%^&*()[]{}",
    "def f(x):\n    return x ** 2  # code",
    "Unicode: héllo wörld, 東京, Привет, 🙂👍",
]


def _check_exists(name, what):
    """A name that looks like a path must exist; anything else is treated as a Hub id. A local
    path that cannot be a model is refused here, where the reason is still known: transformers
    would say only that no tokenizer could be built."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not path.exists():
        raise UserError(f"{what} path {name} does not exist; pass a model directory or a Hub id")
    if path.is_file():
        raise UserError(f"{what} path {name} is a file; pass the model's directory (the one "
                        f"holding config.json)")
    if not path.is_dir() or (path / "config.json").exists():
        return
    if not any(path.iterdir()):
        raise UserError(f"{what} directory {name} could not be loaded (it is empty); it should "
                        f"hold a Hugging Face model saved with save_pretrained")
    if any(path.glob("*.gguf")):
        raise UserError(f"{what} directory {name} could not be loaded (it holds GGUF files, "
                        f"llama.cpp's format, and no config.json); pass the Hugging Face model "
                        f"(config.json, safetensors, tokenizer) the GGUF was made from")


def _load_error(name, what, exc):
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc) or "contains custom code" in str(exc):
        return UserError(f"{what} {name} ships its own Python code, which is not run by default; "
                         f"pass --trust-remote-code only if you have read and trust that code")
    if Path(name).expanduser().is_dir():
        return UserError(f"{what} directory {name} could not be loaded ({first_line}); it should "
                         f"hold a Hugging Face model saved with save_pretrained")
    return UserError(f"{what} '{name}' is not a local directory and could not be loaded from the "
                     f"Hugging Face Hub ({first_line}); check the name, your network and HF_TOKEN, "
                     f"or pass a local directory")


def load_tokenizer(name, trust_remote_code=False, what="model"):
    from transformers import AutoTokenizer

    _check_exists(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(name, f"{what} tokenizer", exc) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss, so reusing EOS is safe. Remembered so
        # that the exported tokenizer is saved as the user gave it (export_student).
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.pad_token_borrowed_from_eos = True
    if tokenizer.pad_token is None:
        raise UserError(f"{what} tokenizer {name} has neither a pad nor an eos token; set one in "
                        f"its tokenizer_config.json")
    return tokenizer


def resolve_dtype(dtype):
    """"auto" or a torch dtype from its name (the flags' choices are float32, bfloat16, float16)."""
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(name, dtype="auto", trust_remote_code=False, what="model"):
    """A causal LM from a directory or Hub id; safetensors preferred, never pickle by default."""
    from transformers import AutoModelForCausalLM

    _check_exists(name, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=None)
    except Exception as exc:
        raise _load_error(name, what, exc) from None
    return model


def load_student(name, dtype="auto", trust_remote_code=False, adapters=False):
    """The model to train. 'auto' means float32 whatever the checkpoint stores: most Hub
    checkpoints are bfloat16, and AdamW on bfloat16 weights drops every update smaller than
    1/256 of the weight, so the student barely learns (bf16 compute is --mixed-precision's job).
    A low-precision dtype is used only when asked for, with a warning. With `adapters` (a LoRA
    student) the weights are frozen and only the adapters, which peft keeps in float32, are
    updated: 'auto' keeps the checkpoint's dtype, and low precision needs no warning."""
    if adapters:
        return load_model(name, dtype, trust_remote_code, "student")
    if dtype in ("bfloat16", "float16") and is_rank_zero():
        print(f"warning: the student's weights and optimizer state are {dtype} (--dtype or "
              f"--student-dtype {dtype}), which loses small updates; for float32 weights with "
              f"{dtype} compute pass --student-dtype float32 --mixed-precision "
              f"{'bf16' if dtype == 'bfloat16' else 'fp16'}", file=sys.stderr)
    return load_model(name, "float32" if dtype == "auto" else dtype, trust_remote_code, "student")


def freeze(model):
    """Teacher: eval mode (no dropout) and no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def real_vocab_size(tokenizer):
    """Number of token ids the tokenizer can produce (embeddings may have padded rows beyond it)."""
    return len(tokenizer)


def check_vocab_fits(model, tokenizer, what):
    weight = model.get_output_embeddings().weight
    # Under DeepSpeed ZeRO-3 init the local tensor is an empty partition; ds_shape is the real one.
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    if rows < real_vocab_size(tokenizer):
        raise UserError(f"{what} has {rows} output rows but its tokenizer has "
                        f"{real_vocab_size(tokenizer)} tokens; resize the model's embeddings or "
                        f"use the tokenizer it was trained with")


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name, student_name):
    """Refuse pairs that do not map text to the same ids (same-vocabulary methods need that)."""
    hint = "use cross_tokenizer.py to distill across different vocabularies"
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise UserError(f"teacher {teacher_name} and student {student_name} have different "
                        f"vocabularies ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
                        f"{differing} entries differ); {hint}")
    for text in _PROBE_TEXTS:
        if teacher_tokenizer(text, add_special_tokens=False)["input_ids"] != \
                student_tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise UserError(f"teacher {teacher_name} and student {student_name} share a "
                            f"vocabulary but split text differently ({text[:30]!r}); {hint}")
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise UserError(f"teacher and student tokenizers use different end-of-sequence tokens "
                        f"({teacher_tokenizer.eos_token!r} vs {student_tokenizer.eos_token!r}); "
                        f"{hint}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# A retrained model differs in nearly every weight, so a few spread-out blocks of each file tell
# two versions apart without reading tens of gigabytes on every run.
_SAMPLE_BLOCKS, _BLOCK_BYTES = 16, 64 * 1024


def model_directory(name):
    """The local directory holding `name`'s files: the path itself, or the Hugging Face cache's
    snapshot of a Hub id (found offline; None when it is not downloaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception:  # not a Hub id, or not in the cache: nothing to fingerprint
        return None


def weights_fingerprint(name):
    """A short hash that changes when the model's weights change under the same name: every
    weight file's name and size plus sampled blocks of its bytes (the first block holds the
    safetensors header). File times are left out so that a copied model keeps its fingerprint.
    None when the model has no local files."""
    directory = model_directory(name)
    if directory is None:
        return None
    files = sorted(p for p in directory.iterdir() if p.is_file() and
                   (p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json"))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            step = max((size - _BLOCK_BYTES) // (_SAMPLE_BLOCKS - 1), 1)
            for offset in sorted({min(i * step, max(size - _BLOCK_BYTES, 0))
                                  for i in range(_SAMPLE_BLOCKS)}):
                f.seek(offset)
                digest.update(f.read(_BLOCK_BYTES))
    return digest.hexdigest()[:16]


# transformers sets tokenizer.model_max_length to 1e30 when the tokenizer does not know it.
_SANE_CONTEXT = 10 ** 8


def context_length(name, tokenizer=None):
    """(tokens, where the number comes from) for the model `name`: its config's
    max_position_embeddings, else a sane tokenizer.model_max_length; (None, None) if neither."""
    directory = model_directory(name) if name else None
    if directory is not None and (directory / "config.json").is_file():
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(directory)
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            positions = getattr(config, "max_position_embeddings", None)
            if isinstance(positions, int) and 0 < positions < _SANE_CONTEXT:
                return positions, "max_position_embeddings in its config"
        except Exception:  # a config transformers cannot read: fall back to the tokenizer
            pass
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and 0 < model_max_length < _SANE_CONTEXT:
        return model_max_length, "model_max_length in its tokenizer config"
    return None, None


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
