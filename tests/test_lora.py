"""LoRA students (--lora-r): only the adapters train, the run resumes exactly, and the export's
merged student gives the logits of the base student with the adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from common.args import parse_args
from common.errors import UserError
from common.lora import LoraArguments
from conftest import run_script
from float32_error import UNIT_ROUNDOFF, decoder_roundings

peft = pytest.importorskip("peft")


def token_level_args(tiny, out, *extra):
    return ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
            tiny / "train.jsonl", "--output-dir", out, "--batch-size", "4", "--log-steps", "1",
            "--learning-rate", "1e-2", "--lora-r", "4", "--lora-dropout", "0.1", *extra]


@pytest.mark.slow
def test_lora_student_trains_adapters_only_and_resumes_exactly(tiny, tmp_path):
    out = tmp_path / "lora"
    args = token_level_args(tiny, out, "--max-steps", "4", "--save-steps", "2")
    result = run_script("token_level.py", *args)
    assert "LoRA r=4: 4,096 trainable parameters" in result.stdout
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["lora"]["lora_r"] == 4 and "adapter" in run_config["files"]
    # The base weights in the checkpoint are the student's own: only adapters were trained.
    base = load_file(tiny / "student" / "model.safetensors")
    checkpoint = load_file(out / "checkpoints" / "step_000002" / "model.safetensors")
    frozen = {n: t for n, t in checkpoint.items() if "lora_" not in n}
    assert frozen and all(torch.equal(t, base[n.replace("base_model.model.", "").replace(
        ".base_layer", "")]) for n, t in frozen.items())
    assert any("lora_B" in n and t.abs().max() > 0 for n, t in checkpoint.items())
    merged = load_file(out / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")

    # Unfinish the run (as if killed after step 2's checkpoint) and resume: dropout's random
    # state and the adapters' optimizer state come back, so steps 3-4 repeat exactly.
    for name in run_config["files"]:
        path = out / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    (out / "run_config.json").unlink()
    assert "resumed from" in run_script("token_level.py", *args, "--resume").stdout
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, merged[name]), name
    for name, tensor in load_file(out / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(tensor, adapter[name]), name


@pytest.mark.slow
def test_merged_student_equals_base_plus_adapter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run_script("token_level.py", *token_level_args(tiny, out, "--max-steps", "3"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain model directory
    base = AutoModelForCausalLM.from_pretrained(tiny / "student")
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    input_ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator()
                              .manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
        reference = with_adapter.double()(input_ids).logits  # base + adapter in float64
        untrained = AutoModelForCausalLM.from_pretrained(tiny / "student")(input_ids).logits
    # The budget of a float32 forward pass, plus the merge's own roundings per adapted weight
    # (r products and sums, the scaling, the add).
    roundings = decoder_roundings(merged.config, 24) + 2 * (4 + 2) * merged.config.num_hidden_layers
    bound = roundings * UNIT_ROUNDOFF * reference.abs().max().item()
    assert (merged_logits.double() - reference).abs().max().item() <= bound
    assert (untrained - merged_logits).abs().max().item() > 100 * bound  # the adapter matters


@pytest.mark.slow
def test_sequence_level_takes_a_lora_student(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "seq"
    result = run_script("sequence_level.py", "--teacher", tiny / "teacher", "--student",
                        tiny / "student", "--dataset", tiny / "train.jsonl", "--max-samples", "8",
                        "--max-new-tokens", "8", "--max-steps", "2", "--batch-size", "4",
                        "--output-dir", out, "--lora-r", "2", "--lora-target-modules", "q_proj",
                        "v_proj")
    assert "LoRA r=2" in result.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 2
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("on_policy.py", ["--teacher", "teacher", "--lmbda", "1.0", "--max-new-tokens", "8"]),
    ("cross_tokenizer.py", ["--teacher", "teacher", "--hybrid"]),
])
def test_on_policy_and_cross_tokenizer_take_a_lora_student(tiny, tmp_path, script, extra):
    """Adapters only: the base weights the run saved equal the student's, the adapter moved."""
    from transformers import AutoModelForCausalLM

    student = tiny / ("student" if script == "on_policy.py" else "student_sp")
    extra = [str(tiny / e) if e == "teacher" else e for e in extra]
    out = tmp_path / "out"
    result = run_script(script, *extra, "--student", student, "--dataset", tiny / "train.jsonl",
                        "--output-dir", out, "--max-steps", "2", "--batch-size", "4",
                        "--learning-rate", "1e-2", "--lora-r", "2")
    assert "LoRA r=2" in result.stdout
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and adapter[name].abs().sum() > 0
               for name in adapter)  # B starts at zero: nonzero means the adapters trained
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(student)
    changed = [name for name, weight in base.state_dict().items()
               if not torch.equal(weight, merged.state_dict()[name])]
    assert changed and all("proj" in name for name in changed)  # only adapted layers merged in
    assert json.loads((out / "run_config.json").read_text())["lora"]["lora_r"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
])
def test_bad_lora_settings(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_args((LoraArguments,), argv)


@pytest.mark.slow
def test_unknown_target_module_is_a_one_line_error(tiny, tmp_path):
    result = run_script("token_level.py", *token_level_args(tiny, tmp_path / "o", "--max-steps",
                                                            "1", "--lora-target-modules",
                                                            "qproj"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --lora-target-modules qproj:") and "qproj" in last
