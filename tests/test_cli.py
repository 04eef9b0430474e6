"""The `nanoforge` command: compile / inspect / generate, and every bad input ending in a
one-line error that names the culprit, exit status 2, and no partial plan dir."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from nanoforge.cli import main
from nanoforge.passes import PIPELINES

QWEN3_8B = {  # the real Qwen3-8B config.json, for a config-only compile
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
}


def fails_with(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_compile_inspect_generate(tiny_ckpt, tmp_path, capsys):
    plan, dumps = tmp_path / "plan", tmp_path / "dumps"
    assert main(["compile", str(tiny_ckpt("qwen3_moe")), "-o", str(plan), "--dump-dir", str(dumps)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "s (trace" in out
    assert (plan / "plan.json").is_file() and (plan / "ir" / "forward.ir").is_file()
    source = (plan / "generated" / "model.py").read_text()
    assert source.count("K.torch.") + source.count("K.cpu.") > 10 and "K.cpu.attention(" in source
    assert (dumps / "index.txt").is_file() and len(list(dumps.glob("[0-9][0-9]_*.ir"))) == len(PIPELINES["default"]) + 1
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM" in out and "moe" in out and "provider torch" in out and "KV" in out
    assert main(["generate", str(plan), "--prompt", "Hello", "--prompt", "The sky", "--max-tokens", "5",
                 "--ignore-eos", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(len(x["token_ids"]) == 5 and isinstance(x["text"], str) for x in lines)


def test_qwen3_8b_config_only_compiles_under_3s(tmp_path, capsys):
    ckpt = tmp_path / "qwen3-8b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN3_8B))
    start = time.perf_counter()
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "plan"), "--config-only"]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"compile took {elapsed:.2f} s"
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["stats"]["total_ms"] < 3000
    assert plan["memory"]["param_bytes"] == 2 * 8_190_735_360  # Qwen3-8B has 8.19 B params
    fails_with(capsys, ["generate", str(tmp_path / "plan"), "--prompt", "x"], "--config-only")


def test_missing_config(tmp_path, capsys):
    fails_with(capsys, ["compile", str(tmp_path), "-o", str(tmp_path / "plan")], "config.json")
    assert not (tmp_path / "plan").exists()


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    fails_with(capsys, ["compile", str(tmp_path), "-o", str(tmp_path / "plan"), "--config-only"],
               "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")
    assert not (tmp_path / "plan").exists()


def _rewrite_tensor(path, key, new):
    from safetensors.torch import load_file, save_file

    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        if key in tensors:
            new(tensors, key)
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise KeyError(key)


def test_missing_tensor(tiny_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(tiny_ckpt("llama"), tmp_path / "ck")
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_tensor(ckpt, key, lambda t, k: t.pop(k))
    fails_with(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "plan")], key)
    assert not (tmp_path / "plan").exists() and list(tmp_path.iterdir()) == [ckpt]


def test_wrong_shape(tiny_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(tiny_ckpt("llama"), tmp_path / "ck")
    key = "model.layers.2.self_attn.k_proj.weight"
    _rewrite_tensor(ckpt, key, lambda t, k: t.__setitem__(k, t[k][:-1].clone()))
    fails_with(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "plan")], key, "shape")
    assert not (tmp_path / "plan").exists()


def test_truncated_safetensors(tiny_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(tiny_ckpt("llama"), tmp_path / "ck")
    f = next(ckpt.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1000])
    fails_with(capsys, ["compile", str(ckpt), "-o", str(tmp_path / "plan")], f.name, "truncated")
    assert not (tmp_path / "plan").exists()


def test_plan_for_another_checkpoint(tiny_ckpt, tmp_path, capsys):
    plan = tmp_path / "plan"
    assert main(["compile", str(tiny_ckpt("llama")), "-o", str(plan), "-q"]) == 0
    other = tiny_ckpt("llama", seed=1)
    fails_with(capsys, ["generate", str(plan), "--checkpoint", str(other), "--prompt", "hi"],
               "does not match", ".safetensors")
    capsys.readouterr()
    # a checkpoint changed in place since compile is caught the same way
    moved = copy_ckpt(tiny_ckpt("llama"), tmp_path / "ck")
    assert main(["compile", str(moved), "-o", str(plan), "-q"]) == 0
    _rewrite_tensor(moved, "model.norm.weight", lambda t, k: t.__setitem__(k, t[k].double()))
    fails_with(capsys, ["generate", str(plan), "--prompt", "hi"], "does not match")


def test_unknown_plan_format_version(tiny_ckpt, tmp_path, capsys):
    plan = tmp_path / "plan"
    assert main(["compile", str(tiny_ckpt("qwen3")), "-o", str(plan), "-q"]) == 0
    data = json.loads((plan / "plan.json").read_text())
    data["format_version"] = 99
    (plan / "plan.json").write_text(json.dumps(data))
    fails_with(capsys, ["generate", str(plan), "--prompt", "hi"], "format version 99")
    fails_with(capsys, ["inspect", str(plan)], "format version 99")


def test_compile_refuses_to_overwrite_a_non_plan_dir(tiny_ckpt, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    fails_with(capsys, ["compile", str(tiny_ckpt("qwen3")), "-o", str(precious)], "not a nanoforge plan")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_console_script_exit_status(tmp_path):
    exe = shutil.which("nanoforge", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([exe, "compile", str(tmp_path), "-o", str(tmp_path / "p")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "config.json" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def llama_plan(tiny_ckpt, tmp_path_factory):
    plan = tmp_path_factory.mktemp("plans") / "llama"
    assert main(["compile", str(tiny_ckpt("llama")), "-o", str(plan), "-q"]) == 0
    return plan


@pytest.mark.parametrize("field, value, needles", [
    ("checkpoint", "nope", ["plan.json.checkpoint: expected an object, got a string"]),
    ("target", None, ["plan.json.target: expected an object, got null"]),
    ("model", 12345, ["plan.json.model: expected an object, got a number"]),
    ("checkpoint.path", 7, ["plan.json.checkpoint.path: expected a string, got a number"]),
    ("ir", "module\nmeta kv_contract = {\"block_size\": \"16\"}\n", ["kv_contract.block_size: expected an integer"]),
])
def test_wrong_typed_plan_field_is_named(llama_plan, tmp_path, capsys, field, value, needles):
    """A hand-edited plan.json: every command that reads it names the field, without a traceback."""
    plan = tmp_path / "plan"
    shutil.copytree(llama_plan, plan)
    data = json.loads((plan / "plan.json").read_text())
    where, *rest = field.split(".")
    if rest:
        data[where][rest[0]] = value
    elif field == "ir":  # a fact inside the IR: its text keeps every line but this one fact
        lines = [x for x in data["ir"].splitlines() if not x.startswith("meta kv_contract")]
        data["ir"] = "\n".join(lines[:1] + value.splitlines()[1:] + lines[1:])
    else:
        data[where] = value
    (plan / "plan.json").write_text(json.dumps(data))
    fails_with(capsys, ["inspect", str(plan)], *needles)
    fails_with(capsys, ["generate", str(plan), "--prompt", "hi"], *needles)


def test_inspect_into_a_closed_pipe_ends_quietly(llama_plan):
    """`nanoforge inspect PLAN --nodes | head -5`: no BrokenPipeError traceback, exit status 0."""
    r = subprocess.run(f"'{sys.executable}' -m nanoforge.cli inspect '{llama_plan}' --nodes | head -5",
                       shell=True, capture_output=True, text=True, executable="/bin/bash",
                       env={**__import__("os").environ, "PYTHONUNBUFFERED": "0"})
    assert len(r.stdout.splitlines()) == 5
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    r = subprocess.run(f"set -o pipefail; '{sys.executable}' -m nanoforge.cli inspect '{llama_plan}' --nodes | head -1",
                       shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert r.returncode == 0, r.stderr


def test_generate_max_tokens_beyond_the_context_is_refused_at_once(llama_plan, capsys):
    """The server's 400 rule, on the command line: no silent cap, no minutes of work first."""
    start = time.perf_counter()
    fails_with(capsys, ["generate", str(llama_plan), "--prompt", "hi", "--max-tokens", "100000", "--json"],
               "max_tokens (100000)", "max_model_len", "lower max_tokens to at most")
    assert time.perf_counter() - start < 60


def test_plan_dir_has_the_permissions_of_its_subdirs(llama_plan):
    """mkdtemp made the plan dir 0700 while ir/ and generated/ were 0755: readable by the same people now."""
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(llama_plan) == mode(llama_plan / "ir") == mode(llama_plan / "generated")


@pytest.mark.parametrize("command", ["serve", "route"])
def test_a_taken_port_fails_before_the_model_loads_or_the_engines_answer(command, tmp_path, capsys):
    """serve and route listen first (as vLLM does): a taken port is a one-line error in a second,
    not after minutes of loading; here the model does not even exist and no engine runs."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = str(holder.getsockname()[1])
        argv = ["serve", str(tmp_path / "missing")] if command == "serve" else \
            ["route", "--engine", "tcp://127.0.0.1:1"]
        fails_with(capsys, [*argv, "--port", port], f"{command}: cannot listen on 127.0.0.1:{port}")
