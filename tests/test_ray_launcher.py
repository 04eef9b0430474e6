"""`launcher="ray"`: the worker ranks of a sharded plan as Ray actors (CPU, gloo) on a local Ray
cluster that this module starts once. tp=2 and attention_dp=2 x ffn_ep=2 give tp=1's greedy
tokens; a killed actor ends the next step with an error naming its rank (no hang); closing the
LLM leaves no actor and no placement group; a driver that dies takes its actors with it. The
checkpoint, prompts and reference tokens are tests/test_distributed.py's."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nanoforge import LLM, SamplingParams
from nanoforge.cli import main
from nanoforge.errors import NanoForgeError
from test_distributed import ENGINE, PROMPTS, Ranks, ckpt, greedy, ref  # noqa: F401 - ckpt, ref: fixtures


@pytest.fixture(scope="module")
def ray():
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"launcher ray needs Ray (pip install ray; it is in the test extra): {e}")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ranks(ray):
    r = Ranks()
    yield r
    r.close()
    assert live_actors(ray) == []


def live_actors(ray) -> list[str]:
    """NanoForge's rank actors still alive (their names are nanoforge-RUN-rankR), and its placement
    groups not yet removed."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("nanoforge-")]
    groups = [g["name"] for g in ray.util.placement_group_table().values()
              if g["name"].startswith("nanoforge-") and g["state"] != "REMOVED"]
    return names + groups


def test_tp2_ray_actors_give_tp1_tokens(ray, ckpt, ref, ranks):
    from nanoforge.runtime.launchers import RayLauncher

    llm = ranks.get("tp2", lambda: LLM(ckpt, tp=2, launcher="ray", **ENGINE))
    runner = llm.engine.runner
    assert isinstance(runner.launcher, RayLauncher) and len(runner.workers) == 1
    assert runner.launcher.store_host == "127.0.0.1"  # every rank on this node
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy())] == ref[1]
    assert len(live_actors(ray)) == 2  # the rank 1 actor and its placement group


def test_killed_actor_is_named_not_a_hang(ray, ckpt, ranks):
    llm = ranks.get("tp2", lambda: LLM(ckpt, tp=2, launcher="ray", **ENGINE))
    where = llm.engine.runner.launcher.where[0]
    threading.Timer(0.3, ray.kill, (llm.engine.runner.workers[0],)).start()
    start = time.monotonic()
    with pytest.raises(NanoForgeError, match=rf"worker rank 1 \(actor {where['actor'][:12]}, pid {where['pid']} on "
                                             r"[^)]+\) died: The actor is dead because it was killed by `ray.kill`"):
        llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert time.monotonic() - start < 15
    with pytest.raises(NanoForgeError, match="worker rank 1"):  # later steps fail the same way, at once
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert live_actors(ray) == []  # the failure stopped the ranks
    ranks.close()
    assert not llm.engine.runner.tmp.exists()  # its files went to the actor as bytes; no logs there


def test_failed_rank_names_its_error(ray, ckpt, ranks, monkeypatch):
    """A rank that fails at start-up returns its last error line with its task. The driver's
    NANOFORGE_* variables reach the actors (this one breaks the worker's import only: the
    driver has read it already)."""
    ranks.close()
    monkeypatch.setenv("NANOFORGE_DIST_TIMEOUT", "soon")
    with pytest.raises(NanoForgeError, match=r"worker rank 1 \(actor \w+, pid \d+ on [^)]+\) exited with status 1: "
                                             r"ValueError: could not convert string to float: 'soon'"):
        LLM(ckpt, tp=2, launcher="ray", **ENGINE)
    assert live_actors(ray) == []


def test_attention_dp2_ffn_ep2_ray_actors_give_tp1_tokens(ray, ckpt, ref, ranks):
    llm = ranks.get("dp2ep2", lambda: LLM(ckpt, attention_dp=2, ffn_ep=2, launcher="ray",
                                          **ENGINE))
    assert len(llm.engine.runner.workers) == 1  # the two ranks are both replicas and expert shards
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy())] == ref[1]
    ranks.close()
    assert live_actors(ray) == []


def test_actors_die_with_their_driver(ray, ckpt, tmp_path):
    """A driver killed by SIGKILL (no close, no atexit) leaves no actor: Ray kills the actors its
    job owns."""
    script = textwrap.dedent(f"""
        import sys, ray
        from nanoforge import LLM
        ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)
        llm = LLM({str(ckpt)!r}, tp=2, launcher="ray", dtype="f32", progress=False,
                  num_blocks=64, max_model_len=256)
        print("up", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "driver.log", "wb"), text=True)
    try:
        assert proc.stdout.readline() == "up\n", (tmp_path / "driver.log").read_text()[-3000:]
        assert len(live_actors(ray)) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while any(n.endswith("-rank1") for n in live_actors(ray)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(n.endswith("-rank1") for n in live_actors(ray))


def test_launcher_choices_and_one_rank(ckpt, ref, caplog, monkeypatch, capsys):
    with pytest.raises(NanoForgeError, match=r"unknown launcher 'mpi': choose one of local, ray"):
        LLM(ckpt, launcher="mpi", **ENGINE)
    with pytest.raises(SystemExit):
        main(["generate", str(ckpt), "--launcher", "mpi", "--prompt", "hi"])
    assert "invalid choice: 'mpi'" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="nanoforge.engine"):
        llm = LLM(ckpt, launcher="ray", **ENGINE)  # one rank: nothing to launch
    assert "launcher ray ignored: the plan runs as one rank" in caplog.text
    assert llm.generate(PROMPTS[0], greedy()[0])[0].token_ids == ref[1][0]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(NanoForgeError, match=r"^--launcher ray needs Ray, which is not installed: pip install ray$"):
        LLM(ckpt, tp=2, launcher="ray", **ENGINE)
